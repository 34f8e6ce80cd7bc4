"""Entrypoint for `ray job submit`: stage 2 (top-k cosine neighbours) over one config.

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/neighbors.py configs/beauty.yaml neighbors.k=10

Runs the stages it needs first (finished ones are skipped). Thin: same function as `grlm neighbors`.
"""

from __future__ import annotations

import sys

from grlm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["neighbors", *sys.argv[1:]]))
