"""Entrypoint for `ray job submit`: IIFT (SFT data, then fine-tuning on Ray Train) over one config.

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train.py configs/iift/qwen3-4b.yaml run.root=s3://bucket/runs

Runs the stages training needs (finished ones are skipped) and the fine-tune itself; submitting the same
command again after an interruption resumes from the last checkpoint. Thin: same function as `grlm train`.
"""

from __future__ import annotations

import sys

from grlm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
