"""Entrypoint for `ray job submit`: the compression-settings comparison (IIFT + eval per K and raw).

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/compression_comparison.py configs/demo.yaml compress.ks='[40,80,160]'

Writes <run>/compare/{comparison.json,csv,png} and an MLflow run; `grlm compare EXPERIMENT` prints it.
"""

from __future__ import annotations

import sys

from grlm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["compression-comparison", *sys.argv[1:]]))
