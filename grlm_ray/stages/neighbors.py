"""Stage 2b — neighbours: top-k cosine neighbours of every item (self excluded), on Ray Data.

Query blocks are sharded over actors that each hold the index, built from the embeddings artifact they read
themselves. 'exact': blocked matrix products; 'flat': faiss exact inner product; 'ivf': faiss IVF
(approximate), which 'auto' picks above ``ivf_threshold`` items: its recall@k against exact search is
measured on a seeded sample and kept in the stage's info (``neighbors.recall_sample``).
Contract: embed/embeddings -> neighbors/neighbors (item_id, neighbor_ids, scores desc).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np
import pyarrow as pa

from grlm_ray.core.config import GrlmConfig, NeighborsConfig
from grlm_ray.core.runtime import actor_pool_kwargs, init_ray
from grlm_ray.core.schemas import NEIGHBORS
from grlm_ray.core.run import Run
from grlm_ray.core.storage import StageContext, Store, release_arrow_memory

STAGE = "neighbors"
log = logging.getLogger(__name__)


def topk_exact(queries: np.ndarray, query_rows: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[q, d] x [n, d] -> (indices [q, k], scores [q, k]) by inner product, excluding each query's own row."""
    scores = queries @ base.T  # [q, n]
    scores[np.arange(len(query_rows)), query_rows] = -np.inf
    k = min(k, base.shape[0] - 1)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # [q, k] unordered
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(part_scores, order, axis=1)


def sample_vectors(store: Store, rel: str, rows: np.ndarray, block_rows: int = 65536) -> np.ndarray:
    """The vectors of ``rows`` (sorted) of an embeddings artifact, read a block at a time."""
    parts = []
    for start, block in store.embedding_blocks(rel, block_rows):
        pick = rows[(rows >= start) & (rows < start + len(block))] - start
        parts.append(block[pick].copy())
    dim = parts[0].shape[1] if parts else store.embeddings_shape(rel)[1]
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def sampled_recall(store: Store, rel: str, found: np.ndarray, sample: int, block_rows: int = 16384) -> dict[str, Any]:
    """Recall@k of ``found`` ([n, k] row indices, -1 = none) against exact inner-product search, on a seeded
    sample of rows: the sample's vectors, then its exact top-k over the embeddings artifact streamed a block
    at a time (memory: the sample x one block of scores, never the matrix)."""
    n, k = found.shape
    rows = np.sort(np.random.default_rng(0).choice(n, size=min(n, sample), replace=False))
    if not len(rows) or not k:
        return {"recall_at_k": None, "recall_sample": 0}
    q = sample_vectors(store, rel, rows, block_rows)
    best_s = np.full((len(rows), k), -np.inf, np.float32)
    best_i = np.full((len(rows), k), -1, np.int64)
    for start, block in store.embedding_blocks(rel, block_rows):
        s = q @ block.T
        own = (rows >= start) & (rows < start + len(block))
        s[np.flatnonzero(own), rows[own] - start] = -np.inf  # an item is not its own neighbour
        s = np.concatenate([best_s, s], axis=1)  # the best so far, then this block's rows
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_i = np.where(top < k, np.take_along_axis(best_i, np.minimum(top, k - 1), axis=1), start + top - k)
        best_s = np.take_along_axis(s, top, axis=1)
    hits = [len(set(e[e >= 0].tolist()) & set(f[f >= 0].tolist())) / k for e, f in zip(best_i, found[rows])]
    return {"recall_at_k": round(float(np.mean(hits)), 4), "recall_sample": len(rows)}


def ivf_nlist(cfg: NeighborsConfig, n: int) -> int:
    return max(1, min(n, cfg.ivf_nlist or round(n / cfg.ivf_list_size)))


def training_rows(cfg: NeighborsConfig, n: int, kind: str) -> np.ndarray:
    """The seeded rows an IVF index is trained on: ``TRAIN_PER_LIST`` per list (all rows when fewer)."""
    if kind != "ivf":
        return np.zeros(0, np.int64)
    size = min(n, TRAIN_PER_LIST * ivf_nlist(cfg, n))
    return np.sort(np.random.default_rng(0).choice(n, size=size, replace=False)) if size < n else np.arange(n)


def new_faiss_index(train: np.ndarray, n: int, cfg: NeighborsConfig, kind: str) -> Any:
    """An empty faiss index for ``n`` vectors, trained on ``train`` (rows of ``training_rows``).
    'flat': exact inner product. 'ivf': inverted lists of ~``ivf_list_size`` items. Above a few hundred
    lists the centroids come from two-level spherical k-means (sqrt(nlist) coarse clusters, each split in
    proportion to its size: O(n sqrt(nlist)) instead of O(n nlist)) and a query finds its lists through an
    HNSW graph over the centroids (O(log nlist) instead of a scan of every centroid), so training, adding
    and searching all stay linear in the catalog."""
    import faiss

    d = train.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        nlist = ivf_nlist(cfg, n)
        if nlist < _TWO_LEVEL_FROM:
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(train)
        else:
            from faiss.contrib.clustering import two_level_clustering

            centroids, _ = two_level_clustering(train, int(math.sqrt(nlist)), nlist, spherical=True)
            quant = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
            quant.add(centroids)
            quant.hnsw.efSearch = max(64, 2 * cfg.ivf_nprobe)
            index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(train[:1])  # the quantizer is filled: nothing left to learn
        index.nprobe = cfg.ivf_nprobe
    if cfg.use_gpu and hasattr(faiss, "StandardGpuResources"):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def build_faiss_index(base: np.ndarray, cfg: NeighborsConfig, kind: str) -> Any:
    """``new_faiss_index`` trained on ``base``'s training rows, with every row of ``base`` added."""
    index = new_faiss_index(base[training_rows(cfg, base.shape[0], kind)], base.shape[0], cfg, kind)
    index.add(base)
    return index


TRAIN_PER_LIST = 64
_TWO_LEVEL_FROM = 256  # lists


def choose_index(cfg: NeighborsConfig, n: int) -> str:
    if cfg.index != "auto":
        return cfg.index
    return "ivf" if n > cfg.ivf_threshold else "flat"


def searcher_threads(cfg: NeighborsConfig) -> int:
    """faiss threads per searcher: configured, else this node's CPUs shared among the searchers (an actor
    holding half a CPU would otherwise get OMP_NUM_THREADS=1 from Ray and leave the node's other cores idle)."""
    if cfg.threads:
        return cfg.threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // cfg.num_workers)


class NeighborSearcher:
    """Ray Data callable class: holds the index, answers a batch of query rows. ``source``: the matrix, or
    (store, path) of the embeddings artifact, read by the actor itself. A CPU faiss index is built from the
    artifact a block at a time and queries are read back from it: the matrix is never whole in the actor,
    the driver or the object store (at 1M items, 5.1 GB in a searcher that read it whole; 3.7 GB streamed)."""

    def __init__(self, source: Any, cfg: NeighborsConfig, kind: str) -> None:
        self.cfg, self.kind = cfg, kind
        self.threads = searcher_threads(cfg)
        self.index: Any = None
        base: np.ndarray | None = None
        streamed = kind in ("flat", "ivf") and not cfg.use_gpu and not isinstance(source, np.ndarray)
        if isinstance(source, np.ndarray):
            base = source
        elif not streamed:
            store, rel = source
            base = store.read_embeddings(rel)[1]
        if kind in ("flat", "ivf"):
            import faiss

            faiss.omp_set_num_threads(self.threads)
            if streamed:  # the matrix is never whole here: a training sample, then the rows added a block at a time
                store, rel = source
                self.index = self._streamed_index(store, rel)
            else:
                self.index = build_faiss_index(base, cfg, kind)
            if not cfg.use_gpu:
                if kind == "ivf":
                    self.index.make_direct_map()  # row -> its place in the lists, for reconstruct
                base = None
        self.base = base

    def _streamed_index(self, store: Store, rel: str) -> Any:
        n, _ = store.embeddings_shape(rel)
        index = new_faiss_index(sample_vectors(store, rel, training_rows(self.cfg, n, self.kind)), n, self.cfg,
                                self.kind)
        for _, block in store.embedding_blocks(rel):
            index.add(block)
        release_arrow_memory()
        return index

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows = batch["row"].astype(np.int64)
        k = self.cfg.k
        if self.index is None:
            idx, sc = topk_exact(self.base[rows], rows, self.base, k)
        else:
            import faiss

            # per calling thread (OpenMP's setting is): Ray Data calls from another thread than __init__'s
            faiss.omp_set_num_threads(self.threads)
            q = self.base[rows] if self.base is not None else self.index.reconstruct_batch(rows)
            sc, idx = self.index.search(q, k + 1)  # one extra: the item itself is usually first
            # the item itself (or, when the search missed it, the extra last hit) moves past the k kept
            # columns; the order of the rest is kept (a stable sort on a boolean key)
            order = np.argsort(idx == rows[:, None], axis=1, kind="stable")[:, :k]
            idx, sc = np.take_along_axis(idx, order, axis=1), np.take_along_axis(sc, order, axis=1)
            sc[idx < 0] = -np.inf  # a list too short to give k hits
        return {"row": rows, "idx": idx.astype(np.int64), "score": sc.astype(np.float32)}


def neighbors(cfg: GrlmConfig) -> dict[str, Any]:
    def body(ctx: StageContext) -> None:
        rel = ctx.stage_rel("embed", "embeddings.parquet")
        # the contract checked here, a batch at a time (DataError with file, row, field); the matrix is read
        # by the searchers themselves
        item_ids, _ = ctx.store.read_embeddings(rel, matrix=False)
        n = len(item_ids)
        kind = choose_index(cfg.neighbors, n)
        ray = init_ray(cfg.ray)
        import ray.data

        # query blocks cut in the driver: no read or map tasks (each needs a whole CPU, which a 1-CPU cluster
        # never frees while the searcher actor holds part of it), only the actor pool
        step = max(1, cfg.neighbors.query_batch)
        rows = pa.table({"row": pa.array(np.arange(n, dtype=np.int64))})
        ds = ray.data.from_arrow([rows.slice(s, step) for s in range(0, max(1, n), step)])
        ds = ds.map_batches(
            NeighborSearcher, batch_size=cfg.neighbors.query_batch,
            fn_constructor_kwargs={"source": (ctx.store, rel), "cfg": cfg.neighbors, "kind": kind},
            **actor_pool_kwargs(cfg.ray, cfg.neighbors.num_workers))
        idx = np.full((n, min(cfg.neighbors.k, n - 1)), -1, dtype=np.int64)
        sc = np.full(idx.shape, -np.inf, dtype=np.float32)
        for b in ds.iter_batches(batch_format="numpy", batch_size=None):
            idx[b["row"]] = b["idx"][:, : idx.shape[1]]
            sc[b["row"]] = b["score"][:, : idx.shape[1]]
        valid = idx >= 0
        # Arrow list columns straight from the arrays (row-major keeps each row's order): no Python object
        # per neighbour (10 per item: 10M at 1M items)
        offsets = pa.array(np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32))
        ctx.write("neighbors.parquet", pa.table({
            "item_id": item_ids,
            "neighbor_ids": pa.ListArray.from_arrays(offsets, item_ids.take(pa.array(idx[valid]))),
            "scores": pa.ListArray.from_arrays(offsets, pa.array(sc[valid], pa.float32())),
        }), NEIGHBORS)
        ctx.info.update({"index": kind, "k": cfg.neighbors.k, "items": n,
                         **({"nlist": ivf_nlist(cfg.neighbors, n), "nprobe": cfg.neighbors.ivf_nprobe} if kind == "ivf" else {}),
                         "items_with_fewer_than_k": int((valid.sum(axis=1) < idx.shape[1]).sum())})
        if kind == "ivf" and cfg.neighbors.recall_sample:  # approximate: how approximate, on a sample
            rec = sampled_recall(ctx.store, rel, idx, cfg.neighbors.recall_sample)
            ctx.info.update(rec)
            if rec["recall_at_k"] is not None and rec["recall_at_k"] < cfg.neighbors.min_recall:
                log.warning("neighbours: IVF recall@%d is %.3f against exact search on %d sampled items, below "
                            "neighbors.min_recall=%.2f: raise neighbors.ivf_nprobe (now %d) or use index=flat",
                            idx.shape[1], rec["recall_at_k"], rec["recall_sample"], cfg.neighbors.min_recall,
                            cfg.neighbors.ivf_nprobe)

    return Run.of(cfg).run_stage(STAGE, body, inputs={"embeddings": ("embed", "embeddings.parquet")})
