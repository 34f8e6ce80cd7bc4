"""Text embeddings of items outside the embed stage: the run's stored embeddings plus items added after
training, embedded with the same model and text rules (the cold-start placement in evaluation and serving).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from grlm_ray.core.config import GrlmConfig
from grlm_ray.core.schemas import EMBEDDINGS, embedding_matrix
from grlm_ray.core.run import Run
from grlm_ray.lib.models import resolve_model_path
from grlm_ray.lib.textformat import item_text


def catalog_embeddings(cfg: GrlmConfig, added: list[dict[str, Any]], encoder: Any = None) -> tuple[list[str], np.ndarray]:
    """(ids, unit-norm text embeddings) of every item the embed stage embedded, then of ``added`` (item rows
    added after training: embedded now with the run's model and text rules, as serving embeds an added item)."""
    emb = Run.of(cfg).read_table("embed", "embeddings.parquet", EMBEDDINGS)
    ids = emb.column("item_id").to_pylist()
    base = embedding_matrix(emb)
    if added:
        base = np.vstack([base, embed_rows(cfg, added, encoder).astype(base.dtype)])
        ids += [r["item_id"] for r in added]
    return ids, base


def text_encoder(cfg: GrlmConfig) -> Any:
    """The run's embedding model (``embed.model``) on the CPU."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_model_path(cfg.embed.model), device="cpu")


def embed_rows(cfg: GrlmConfig, rows: list[dict[str, Any]], encoder: Any = None) -> np.ndarray:
    """Unit-norm text embeddings of item rows, with the embed stage's text rules (``item_text``)."""
    encoder = encoder or text_encoder(cfg)
    texts = [item_text(r.get("title") or "", r.get("description") or "", r.get("categories") or [],
                       r.get("brand") or "", r.get("category") or "", cfg.embed.max_chars) for r in rows]
    return encoder.encode(texts, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
