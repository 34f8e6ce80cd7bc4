"""grlm-ray: LLM-based generative recommendation with Term IDs, on Ray.

Pipeline (one module per stage): prepare -> embed/neighbors -> ctg -> iift -> eig -> eval -> serving.
Shared pieces: config, schemas (data contracts), storage, runtime (Ray).
"""

__version__ = "0.1.0"
