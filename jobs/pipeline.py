"""Entrypoint for `ray job submit`: the whole pipeline over one config.

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pipeline.py configs/demo.yaml run.root=s3://bucket/runs

Thin on purpose: parse, load the config, call the same function `grlm demo` calls.
"""

from __future__ import annotations

import sys

from grlm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
