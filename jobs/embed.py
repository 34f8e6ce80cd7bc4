"""Entrypoint for `ray job submit`: stage 2 (sentence embeddings of item text) over one config.

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/embed.py configs/beauty.yaml

Runs the stages it needs first (finished ones are skipped). Thin: same function as `grlm embed`.
"""

from __future__ import annotations

import sys

from grlm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
