"""Entrypoint for `ray job submit`: stage 3 (Context-aware Term Generation) over one config.

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/ctg.py configs/beauty.yaml ctg.llm.backend=vllm

Runs the stages it needs first (finished ones are skipped). Thin: same function as `grlm ctg`.
"""

from __future__ import annotations

import sys

from grlm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["ctg", *sys.argv[1:]]))
