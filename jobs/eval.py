"""Entrypoint for `ray job submit`: stage 5 (beam search, EIG, metrics) over one config.

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/eval.py configs/beauty.yaml eval.backend=vllm eval.use_gpu=true

Runs the stages it needs first (finished ones are skipped). Thin: same function as `grlm eval`.
"""

from __future__ import annotations

import sys

from grlm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
