"""Semantic compression of the TID vocabulary: embed every distinct term, K-means them into K clusters,
map each term to its cluster's *core term* (the member nearest the centroid). A sweep over several K
(plus raw) shows vocabulary size against collisions; each K is logged to MLflow and plotted.

Contract: ctg/terms (or prepare/terms for the provided TIDs; with ``sft.provided_domains``, CTG's terms with those
domains' own in place) -> compress/k<K>/terms + compress/sweep.json.
Within a TID, a term whose core term is already present keeps its own word, so TIDs keep N distinct
terms; collisions the mapping creates are resolved again (``resolve_collisions``) and counted.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from grlm_ray.core.config import GrlmConfig
from grlm_ray.core.registry import stage_key
from grlm_ray.core.schemas import ITEMS, TERMS
from grlm_ray.core.run import Run
from grlm_ray.core.storage import StageContext
from grlm_ray.core.tracking import open_run
from grlm_ray.lib.models import quiet_loading, resolve_model_path
from grlm_ray.lib.terms import colliding_items, keep_provided, resolve_terms_table
from grlm_ray.lib.textformat import domain_lookup

log = logging.getLogger(__name__)
STAGE = "compress"


def core_term_map(vocab: list[str], emb: np.ndarray, k: int, seed: int = 0, niter: int = 25,
                  grouping: str = "semantic") -> dict[str, str]:
    """term -> core term. ``emb`` is [len(vocab), d], L2-normalized. ``grouping="random"``: the control for what
    the meaning of the merged words is worth — k-means' clusters keep their sizes but their members are a seeded
    shuffle of the vocabulary (each cluster's core: its member nearest its centroid, as for the semantic map)."""
    if grouping not in ("semantic", "random"):
        raise ValueError(f"compress.grouping={grouping!r}: expected 'semantic' or 'random'")
    if k >= len(vocab):
        return {t: t for t in vocab}
    import faiss

    km = faiss.Kmeans(emb.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False)
    km.train(emb.astype(np.float32))
    _, assign = km.index.search(emb.astype(np.float32), 1)  # [n_terms, 1]
    assign = assign[:, 0]
    if grouping == "random":  # the same cluster sizes, members drawn without regard to meaning
        assign = assign[np.random.default_rng(seed).permutation(len(assign))]
    sims = np.einsum("nd,nd->n", emb, km.centroids[assign])  # similarity to own centroid
    core: dict[int, int] = {}
    for i, c in enumerate(assign):
        if c not in core or sims[i] > sims[core[c]] or (sims[i] == sims[core[c]] and vocab[i] < vocab[core[c]]):
            core[int(c)] = i
    return {t: vocab[core[int(assign[i])]] for i, t in enumerate(vocab)}


def apply_map(tids: list[list[str]], mapping: dict[str, str], keep_lead: bool = False) -> list[list[str]]:
    """Each term -> its core term (a core already in the TID: the term keeps its own word); ``keep_lead``: the
    first term stays as written."""
    out = []
    for tid in tids:
        new: list[str] = []
        for j, t in enumerate(tid):
            m = t if keep_lead and j == 0 else mapping.get(t, t)
            new.append(m if m not in new else t)
        out.append(new)
    return out


def encode_terms(model_spec: str, terms: list[str]) -> np.ndarray:
    quiet_loading()
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_model_path(model_spec), device="cpu")
    texts = [t.replace("-", " ") for t in terms]
    return model.encode(texts, batch_size=256, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False).astype(np.float32)


def sweep(terms: pa.Table, items: pa.Table, ks: list[int], encode: Callable[[list[str]], np.ndarray],
          seed: int = 0, niter: int = 25, keep_lead: bool = False, grouping: str = "semantic",
          keep_rare: int = 0) -> tuple[list[dict[str, Any]], dict[int, pa.Table]]:
    """Raw and each K: vocabulary size, items colliding after the mapping and after re-resolution, the tables.
    ``keep_lead``: only the terms after the first are clustered and mapped (``compress.keep_lead``);
    ``grouping``: ``compress.grouping`` (semantic k-means, or its clusters with shuffled members);
    ``keep_rare``: terms used by at most that many items stay as written, only the others are clustered
    (``compress.keep_rare``)."""
    tids = terms.column("terms").to_pylist()
    vocab = sorted({t for tid in tids for t in tid})
    clustered = sorted({t for tid in tids for t in tid[1:]}) if keep_lead else vocab
    if keep_rare > 0:
        used_by: dict[str, int] = {}
        for tid in tids:
            for t in set(tid):
                used_by[t] = used_by.get(t, 0) + 1
        clustered = [t for t in clustered if used_by[t] > keep_rare]
    emb = encode(clustered) if clustered else np.zeros((0, 1), np.float32)  # nothing to cluster: every K is raw
    rows = [{"k": "raw", "vocab": len(vocab), "colliding_items_mapped": colliding_items([tuple(t) for t in tids]),
             "colliding_items_after": colliding_items([tuple(t) for t in tids]), "changed_items": 0,
             "distinct_lead_terms": len({tid[0] for tid in tids if tid})}]
    tables: dict[int, pa.Table] = {}
    for k in ks:
        mapping = core_term_map(clustered, emb, k, seed, niter, grouping)
        mapped = apply_map(tids, mapping, keep_lead)
        t = terms.set_column(terms.column_names.index("terms"), "terms", pa.array(mapped, pa.list_(pa.string())))
        collide = colliding_items([tuple(x) for x in mapped])
        resolved, rep = resolve_terms_table(t, items)
        tables[k] = resolved
        final = resolved.column("terms").to_pylist()
        rows.append({"k": k, "vocab": len({x for tid in final for x in tid}),
                     "core_terms": len(set(mapping.values())), "colliding_items_mapped": collide,
                     "colliding_items_after": rep.colliding_items_after, "changed_items": rep.changed_items,
                     "distinct_lead_terms": len({tid[0] for tid in final if tid})})
    return rows, tables


def plot_sweep(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r for r in rows if r["k"] != "raw"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["k"] for r in ks], [r["vocab"] for r in ks], "o-", label="vocabulary after")
    ax.axhline(rows[0]["vocab"], ls="--", c="gray", label="raw vocabulary")
    ax2 = ax.twinx()
    ax2.plot([r["k"] for r in ks], [r["colliding_items_mapped"] for r in ks], "s-", c="C3", label="colliding items (mapped)")
    ax.set_xlabel("K (core terms)")
    ax.set_ylabel("distinct terms")
    ax2.set_ylabel("colliding items before re-resolution")
    fig.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compress(cfg: GrlmConfig) -> dict[str, Any]:
    c = cfg.compress
    src_stage = "ctg" if c.source == "ctg" else "prepare"
    # a joint catalog whose listed domains keep their own TIDs (sft.provided_domains) trains on CTG's terms with
    # theirs in place: that is the vocabulary compressed (theirs too), as the paper compresses the joint one
    provided = list(cfg.sft.provided_domains) if c.source == "ctg" else []

    def body(ctx: StageContext) -> None:
        terms = ctx.read("terms.parquet", TERMS, stage=src_stage)
        if provided:
            own = ctx.read_if_exists("terms.parquet", TERMS, stage="prepare")
            terms, kept = keep_provided(terms, own, provided, domain_lookup(cfg))
            ctx.info["provided_tids_kept"] = kept
        items = ctx.read("items.parquet", ITEMS, stage="prepare")
        rows, tables = sweep(terms, items, sorted(set(c.ks)), lambda v: encode_terms(cfg.embed.model, v),
                             c.seed, c.niter, c.keep_lead, c.grouping, c.keep_rare)
        for k, t in tables.items():
            ctx.write(f"k{k}/terms.parquet", t, TERMS)
        ctx.store.write_json(ctx.rel("sweep.json"), rows)
        ctx.info.update({"source": src_stage, "sweep": rows})
        _log_sweep(cfg, rows)

    key = stage_key(cfg, STAGE) + (f"-provided-{'-'.join(sorted(provided))}" if provided else "")
    return Run.of(cfg).run_stage(STAGE, body, key=key, inputs={"terms": (src_stage, "terms.parquet")})


def _log_sweep(cfg: GrlmConfig, rows: list[dict[str, Any]]) -> None:
    """One MLflow run per K (plus raw), tagged so `mlflow` can compare them; plot as an artifact."""
    if not cfg.tracking.enabled:
        return
    import tempfile

    import mlflow

    with open_run(cfg, STAGE, f"{cfg.run.name}-compress-sweep") as parent:
        mlflow.log_text(json.dumps(rows, indent=2), "sweep.json")
        with tempfile.TemporaryDirectory() as d:
            plot_sweep(rows, f"{d}/compression_sweep.png")
            mlflow.log_artifact(f"{d}/compression_sweep.png")
        for r in rows:
            with open_run(cfg, STAGE, f"{cfg.run.name}-compress-k{r['k']}", parent_run_id=parent.info.run_id,
                          tags={"grlm.compress_k": str(r["k"])}):
                mlflow.log_param("compress/k", r["k"])
                mlflow.log_metrics({k: float(v) for k, v in r.items() if k != "k"})
