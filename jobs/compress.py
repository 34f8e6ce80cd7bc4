"""Entrypoint for `ray job submit`: stage 3 (semantic compression sweep over K) over one config.

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/compress.py configs/beauty.yaml compress.ks='[1000,3000]'

Runs the stages it needs first (finished ones are skipped). Thin: same function as `grlm compress`.
"""

from __future__ import annotations

import sys

from grlm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["compress", *sys.argv[1:]]))
