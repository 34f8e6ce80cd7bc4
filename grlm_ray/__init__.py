"""grlm-ray: LLM-based generative recommendation with Term IDs, on Ray.

    core/     the platform: typed configs, the stage registry (the graph), pipeline, storage, Ray, MLflow
    stages/   prepare -> embed -> neighbors -> ctg -> compress -> sft -> train -> eval  (+ baselines)
    lib/      what stages and serving share: the TID text format, term generation, tokens, decoding, EIG, metrics
    serving/  the Ray Serve application and its live catalog
    bench/    `grlm bench NAME`
"""

__version__ = "0.1.0"
