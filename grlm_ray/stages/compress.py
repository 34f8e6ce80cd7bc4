"""Semantic compression of the TID vocabulary: embed every distinct term, K-means them into K clusters,
map each term to its cluster's *core term* (the member nearest the centroid). A sweep over several K
(plus raw) shows vocabulary size against collisions; each K is logged to MLflow and plotted.

Contract: ctg/terms (or prepare/terms for the provided TIDs; with ``sft.provided_domains``, CTG's terms with those
domains' own in place) -> compress/k<K>/terms + compress/sweep.json.
Within a TID, a term whose core term is already present (or is another of its terms) keeps its own word, so
TIDs keep N distinct terms; collisions the mapping creates are resolved again (``resolve_collisions``) and counted.
``compress.grouping=behaviour`` clusters the terms by what their items do in the training sequences instead of what
the words mean, and a term whose core is taken takes its next nearest core (one item's terms fall in one cluster).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from grlm_ray.core.config import GrlmConfig
from grlm_ray.core.registry import stage_key
from grlm_ray.core.schemas import EMBEDDINGS, ITEMS, SEQUENCES, TARGETS, TERMS
from grlm_ray.core.run import Run
from grlm_ray.core.storage import StageContext
from grlm_ray.core.tracking import open_run
from grlm_ray.lib.models import quiet_loading, resolve_model_path
from grlm_ray.lib.terms import colliding_items, keep_provided, resolve_terms_table
from grlm_ray.lib.textformat import domain_lookup, training_lists

log = logging.getLogger(__name__)
STAGE = "compress"


GROUPINGS = ("semantic", "random", "behaviour")
BEHAVIOUR_DIM = 64  # the item vectors' dimension (truncated SVD of the co-interaction PPMI)
BEHAVIOUR_WINDOW = 3  # items at most this many positions apart in a training sequence co-occur


def core_term_map(vocab: list[str], emb: np.ndarray, k: int, seed: int = 0, niter: int = 25,
                  grouping: str = "semantic") -> dict[str, str]:
    """term -> core term. ``emb`` is [len(vocab), d], L2-normalized (the terms' meaning, or with
    ``grouping="behaviour"`` their items' behaviour: ``behaviour_vectors``; k-means either way).
    ``grouping="random"``: the control for what the meaning of the merged words is worth — k-means' clusters keep
    their sizes but their members are a seeded shuffle of the vocabulary (each cluster's core: its member nearest
    its centroid, as for the semantic map)."""
    return {t: r[0] for t, r in core_term_ranks(vocab, emb, k, seed, niter, grouping, 1).items()}


def core_term_ranks(vocab: list[str], emb: np.ndarray, k: int, seed: int = 0, niter: int = 25,
                    grouping: str = "semantic", n: int = 8) -> dict[str, list[str]]:
    """term -> up to ``n`` core terms, its own cluster's first (``core_term_map``), then the cores of the next
    nearest centroids: where a TID's terms share a cluster (behaviour grouping puts the terms of one item
    together), ``apply_map`` gives the later ones their next core instead of their own word."""
    if grouping not in GROUPINGS:
        raise ValueError(f"compress.grouping={grouping!r}: expected one of {', '.join(GROUPINGS)}")
    if k >= len(vocab):
        return {t: [t] for t in vocab}
    import faiss

    x = emb.astype(np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False)
    km.train(x)
    _, near = km.index.search(x, min(n, k))  # [n_terms, n] nearest centroids, nearest first
    assign = near[:, 0].copy()
    if grouping == "random":  # the same cluster sizes, members drawn without regard to meaning
        perm = np.random.default_rng(seed).permutation(len(assign))
        assign, near = assign[perm], near[perm]
    sims = np.einsum("nd,nd->n", emb, km.centroids[assign])  # similarity to own centroid
    core: dict[int, int] = {}
    for i, c in enumerate(assign):
        if c not in core or sims[i] > sims[core[c]] or (sims[i] == sims[core[c]] and vocab[i] < vocab[core[c]]):
            core[int(c)] = i
    out = {}
    for i, t in enumerate(vocab):
        ranked = [int(assign[i])] + [int(c) for c in near[i] if c != assign[i] and int(c) in core]
        out[t] = [vocab[core[c]] for c in ranked[:n]]
    return out


def apply_map(tids: list[list[str]], mapping: dict[str, str], keep_lead: bool = False,
              ranks: dict[str, list[str]] | None = None) -> list[list[str]]:
    """Each term -> its core term. A core that is already in the TID, or that another of its terms is itself (a
    core maps to itself): the term keeps its own word, or with ``ranks`` takes its next core not in the TID (its
    own word only when all are) — a TID's terms stay distinct. ``keep_lead``: the first term stays as written."""
    out = []
    for tid in tids:
        fixed = {t for j, t in enumerate(tid) if mapping.get(t, t) == t or (keep_lead and j == 0)}
        new: list[str] = []
        for j, t in enumerate(tid):
            if t in fixed:
                new.append(t)
                continue
            options = ranks.get(t, [mapping.get(t, t)]) if ranks else [mapping.get(t, t)]
            new.append(next((m for m in options if m not in new and m not in fixed), t))
        out.append(new)
    return out


def encode_terms(model_spec: str, terms: list[str]) -> np.ndarray:
    quiet_loading()
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_model_path(model_spec), device="cpu")
    texts = [t.replace("-", " ") for t in terms]
    return model.encode(texts, batch_size=256, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False).astype(np.float32)


def item_behaviour(lists: pa.ListArray, item_ids: list[str], dim: int = BEHAVIOUR_DIM,
                   window: int = BEHAVIOUR_WINDOW, seed: int = 0) -> np.ndarray:
    """[len(item_ids), <= dim] L2-normalized item vectors from the training sequences alone (``lists``: each
    user's items with the held-out positions removed): items within ``window`` positions of each other co-occur
    (weight 1/distance, both directions), positive PMI of those counts, truncated SVD (U * sqrt(S)). An item with
    no training interaction gets a zero row."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import svds

    n = len(item_ids)
    codes = _item_codes(lists, item_ids)
    owner = np.repeat(np.arange(len(lists)), np.diff(lists.offsets.to_numpy()))
    rows, cols, vals = [], [], []
    for d in range(1, window + 1):
        same = owner[d:] == owner[:-d]
        a, b = codes[:-d][same], codes[d:][same]
        ok = (a >= 0) & (b >= 0) & (a != b)
        rows += [a[ok], b[ok]]
        cols += [b[ok], a[ok]]
        vals += [np.full(int(ok.sum()), 1.0 / d)] * 2
    r, c, v = (np.concatenate(x) if x else np.zeros(0) for x in (rows, cols, vals))
    m = sp.coo_matrix((v, (r.astype(np.int64), c.astype(np.int64))), shape=(n, n)).tocsr()
    m.sum_duplicates()
    row_sum = np.asarray(m.sum(axis=1)).ravel()
    total = row_sum.sum()
    out = np.zeros((n, dim), np.float32)
    if total == 0:
        return out
    coo = m.tocoo()
    pmi = np.log(coo.data * total / (row_sum[coo.row] * row_sum[coo.col]))
    keep = pmi > 0
    ppmi = sp.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=(n, n))
    k = min(dim, n - 1)
    if k < 1 or ppmi.nnz == 0:
        return out
    u, s, _ = svds(ppmi, k=k, random_state=seed)
    vec = (u * np.sqrt(s)).astype(np.float32)
    norm = np.linalg.norm(vec, axis=1, keepdims=True)
    out[:, :k] = np.where(norm > 0, vec / np.maximum(norm, 1e-12), 0)
    return out


def with_text(item_vecs: np.ndarray, text_vecs: np.ndarray, counts: np.ndarray, c: float) -> np.ndarray:
    """Each item's behaviour vector and its (L2-normalized) text embedding side by side, weighted n / (n + c) and
    c / (c + n) for its n training interactions: an item bought often is placed by its behaviour, one bought rarely
    (or never) by its text. Rows L2-normalized."""
    n = np.asarray(counts, np.float32)[:, None]
    t = text_vecs / np.maximum(np.linalg.norm(text_vecs, axis=1, keepdims=True), 1e-12)
    out = np.concatenate([item_vecs * (n / (n + c)), t * (c / (n + c))], axis=1).astype(np.float32)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def behaviour_vectors(vocab: list[str], tids: list[list[str]], item_vecs: np.ndarray,
                      seed: int = 0) -> tuple[np.ndarray, int]:
    """Each term's behaviour: the normalized sum of the vectors of the items whose TID holds it
    (``item_vecs`` aligned with ``tids``). A term none of whose items was ever trained on gets a seeded random unit
    vector (k-means places it anywhere); returned with how many terms that was."""
    index = {t: i for i, t in enumerate(vocab)}
    out = np.zeros((len(vocab), item_vecs.shape[1]), np.float32)
    for tid, vec in zip(tids, item_vecs):
        for t in set(tid):
            if t in index:
                out[index[t]] += vec
    norm = np.linalg.norm(out, axis=1)
    empty = norm < 1e-9
    if empty.any():
        rnd = np.random.default_rng(seed).normal(size=(int(empty.sum()), out.shape[1])).astype(np.float32)
        out[empty] = rnd
        norm = np.linalg.norm(out, axis=1)
    return out / norm[:, None], int(empty.sum())


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
        ranks = core_term_ranks(clustered, emb, k, seed, niter, grouping)
        mapping = {t: r[0] for t, r in ranks.items()}
        # behaviour puts one item's terms in one cluster: their own words would keep most of the vocabulary (3,400+
        # of Beauty's 7,497 terms at any K); the next core keeps it at about K
        mapped = apply_map(tids, mapping, keep_lead, ranks if grouping == "behaviour" else None)
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
        encode: Callable[[list[str]], np.ndarray] = lambda v: encode_terms(cfg.embed.model, v)
        if c.grouping == "behaviour":  # the terms' items' co-interactions in the training sequences, not the words
            lists = training_lists(ctx.read("sequences.parquet", SEQUENCES, stage="prepare"),
                                   ctx.read("targets.parquet", TARGETS, stage="prepare"))
            tids = terms.column("terms").to_pylist()
            ids = terms.column("item_id").to_pylist()
            item_vecs = item_behaviour(lists, ids, seed=c.seed)
            ctx.info["items_without_training"] = int((np.abs(item_vecs).sum(axis=1) == 0).sum())
            if c.behaviour_text > 0:
                item_vecs = with_text(item_vecs, _text_vectors(ctx, ids), _interaction_counts(lists, ids),
                                      c.behaviour_text)

            def encode(vocab: list[str]) -> np.ndarray:
                vecs, empty = behaviour_vectors(vocab, tids, item_vecs, c.seed)
                ctx.info["terms_without_training"] = empty
                return vecs
        rows, tables = sweep(terms, items, sorted(set(c.ks)), encode,
                             c.seed, c.niter, c.keep_lead, c.grouping, c.keep_rare)
        for k, t in tables.items():
            ctx.write(f"k{k}/terms.parquet", t, TERMS)
        ctx.store.write_json(ctx.rel("sweep.json"), rows)
        ctx.info.update({"source": src_stage, "sweep": rows})
        _log_sweep(cfg, rows)

    key = stage_key(cfg, STAGE) + (f"-provided-{'-'.join(sorted(provided))}" if provided else "")
    inputs = {"terms": (src_stage, "terms.parquet")}
    if c.grouping == "behaviour":
        inputs.update(sequences=("prepare", "sequences.parquet"), targets=("prepare", "targets.parquet"))
        if c.behaviour_text > 0:
            inputs["embeddings"] = ("embed", "embeddings.parquet")
    return Run.of(cfg).run_stage(STAGE, body, key=key, inputs=inputs)


def _interaction_counts(lists: pa.ListArray, item_ids: list[str]) -> np.ndarray:
    """Each item's number of training interactions (``lists``: the training sequences), in ``item_ids`` order."""
    codes = _item_codes(lists, item_ids)
    return np.bincount(codes[codes >= 0], minlength=len(item_ids))


def _item_codes(lists: pa.ListArray, item_ids: list[str]) -> np.ndarray:
    """Every training interaction's position in ``item_ids`` (-1: not a catalog item), in sequence order."""
    import pyarrow.compute as pc

    codes = pc.index_in(pc.list_flatten(lists), value_set=pa.array(item_ids, pa.string()))
    return codes.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def _text_vectors(ctx: StageContext, item_ids: list[str]) -> np.ndarray:
    """The embed stage's item embeddings in ``item_ids`` order; an item without one is an error naming it."""
    emb = ctx.read("embeddings.parquet", EMBEDDINGS, stage="embed")
    row = {i: k for k, i in enumerate(emb.column("item_id").to_pylist())}
    missing = [i for i in item_ids if i not in row]
    if missing:
        raise ValueError(f"compress.behaviour_text: {len(missing)} items have no embedding in embed/embeddings.parquet "
                         f"(first: {missing[0]!r}); run the embed stage over the whole catalog")
    vecs = np.asarray(emb.column("embedding").to_pylist(), np.float32)
    return vecs[[row[i] for i in item_ids]]


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
