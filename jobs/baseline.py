"""Entrypoint for `ray job submit`: SASRec (CE or BCE) and popularity on GRLM's splits and users.

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/baseline.py configs/beauty.yaml baseline.loss=ce eval.limit_users=2000

Runs the stages it needs first (finished ones are skipped). Thin: same function as `grlm baseline`.
"""

from __future__ import annotations

import sys

from grlm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["baseline", *sys.argv[1:]]))
