"""Stage 2a — embed: item text -> sentence embedding, as a Ray Data actor pool.

Contract: prepare/items -> embed/embeddings (item_id, embedding fixed_size_list<float32>, L2-normalized).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa

from grlm_ray.core.config import GrlmConfig
from grlm_ray.core.runtime import actor_pool_kwargs, init_ray
from grlm_ray.core.schemas import EMBEDDINGS, ITEMS
from grlm_ray.core.run import Run
from grlm_ray.core.storage import StageContext
from grlm_ray.lib.models import quiet_loading, resolve_model_path
from grlm_ray.lib.textformat import item_text

log = logging.getLogger(__name__)
STAGE = "embed"


class SentenceEncoder:
    """Ray Data callable class: loads the model once per actor, encodes batches of texts."""

    def __init__(self, model_path: str, device: str, batch_size: int, threads: int) -> None:
        quiet_loading()
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(max(1, threads))
        self.model = SentenceTransformer(model_path, device=device)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = self.model.encode(list(batch["text"]), batch_size=self.batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return {"row": batch["row"], "embedding": emb.astype(np.float32)}


def embed(cfg: GrlmConfig) -> dict[str, Any]:
    model_path = resolve_model_path(cfg.embed.model)

    def body(ctx: StageContext) -> None:
        items = ctx.read("items.parquet", ITEMS, stage="prepare")
        rows = items.select(["item_id", "title", "description", "categories", "brand", "category"]).to_pylist()
        texts = [item_text(r["title"], r["description"], r["categories"], r["brand"], r["category"],
                           cfg.embed.max_chars) for r in rows]
        no_text = sum(1 for r in rows if not (r["title"] or r["description"] or r["categories"] or r["brand"]))
        ray = init_ray(cfg.ray)
        import ray.data

        cpus = int(ray.available_resources().get("CPU", os.cpu_count() or 1))
        threads = max(1, cpus // cfg.embed.num_workers)
        table = pa.table({"row": pa.array(np.arange(len(texts), dtype=np.int64)), "text": texts})
        del texts
        # blocks cut here, in the driver: a repartition is a shuffle task needing a whole CPU, which never
        # gets scheduled on a 1-CPU cluster while the encoder actor holds part of it (embed hung there)
        n_blocks = min(max(cfg.embed.num_workers * 4, 1), max(1, table.num_rows))
        step = -(-table.num_rows // n_blocks) if table.num_rows else 1
        ds = ray.data.from_arrow([table.slice(s, step) for s in range(0, max(1, table.num_rows), step)])
        ds = ds.map_batches(
            SentenceEncoder, batch_size=cfg.embed.batch_size * 4,
            fn_constructor_kwargs={"model_path": model_path, "device": cfg.embed.device,
                                   "batch_size": cfg.embed.batch_size, "threads": threads},
            **actor_pool_kwargs(cfg.ray, cfg.embed.num_workers),
            **({"num_gpus": 1} if cfg.embed.device.startswith("cuda") else {}),
        )
        mat = None  # filled in catalog order as batches land: one copy of the matrix, no reordering
        for b in ds.iter_batches(batch_format="numpy", batch_size=None):
            emb_b = np.asarray(b["embedding"], dtype=np.float32)
            if mat is None:
                mat = np.empty((table.num_rows, emb_b.shape[1]), np.float32)
            mat[b["row"]] = emb_b
        if mat is None:
            mat = np.zeros((0, 0), np.float32)
        dim = int(mat.shape[1])
        emb = pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1), pa.float32()), dim)
        ctx.write("embeddings.parquet", pa.table({"item_id": items.column("item_id"), "embedding": emb}), EMBEDDINGS)
        ctx.info.update({"model": cfg.embed.model, "dim": dim, "items_without_text": no_text,
                         "workers": cfg.embed.num_workers})

    return Run.of(cfg).run_stage(STAGE, body, inputs={"items": ("prepare", "items.parquet")})
