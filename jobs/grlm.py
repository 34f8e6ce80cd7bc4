"""The `ray job submit` entrypoint: `python jobs/grlm.py VERB CONFIG [key=value ...]`, any `grlm` verb.

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/grlm.py demo configs/demo.yaml run.root=s3://bucket/runs         # the whole pipeline
    ray job submit ... -- python jobs/grlm.py train configs/iift/qwen3-4b.yaml      # IIFT (and what it needs)
    ray job submit ... -- python jobs/grlm.py compression-comparison configs/demo.yaml compress.ks='[40,80]'

The verbs are the stage registry's (grlm_ray/core/registry.py: prep, embed, neighbors, ctg, compress, sft, train,
eval, baseline) plus demo and compression-comparison; a stage runs the stages it needs first (finished ones
are skipped; resubmitting an interrupted job resumes it). Thin on purpose: the same function as `grlm VERB`.
"""

from __future__ import annotations

import sys

from grlm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
