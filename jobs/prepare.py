"""Entrypoint for `ray job submit`: stage 1 (prepare) only.

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/prepare.py configs/joint10.yaml data.base_dir=/data/amazon2014_raw
"""

from __future__ import annotations

import sys

from grlm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prep", *sys.argv[1:]]))
