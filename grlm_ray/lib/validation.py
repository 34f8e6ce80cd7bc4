"""Recommendation quality during IIFT: R@K / N@K on a fixed seeded sample of validation users.

The driver writes the sample once (``train/validation.parquet``: the rendered prompts of the users' valid
targets, built by the evaluation's own ``query_table``, never a test target) and ``train/catalog.parquet``
(every item's TID, the popularity fallback order). Every Ray Train worker scores its share of the users
with the model it is training (the same constrained beam search + EIG grounding + metric code as
``grlm eval``), and the sums are all-reduced, so every rank sees the same numbers and takes the same
early-stopping decision. The curve (one point per validation) is saved as JSON and drawn as a plot.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from grlm_ray.core.config import GrlmConfig
from grlm_ray.lib.decoding import TidDecoder
from grlm_ray.lib.eig import TidIndex, tid_text
from grlm_ray.lib.metrics import ndcg_at_k, recall_at_k
from grlm_ray.lib.protocol import query_table, training_popularity

KS = (5, 10)


def build_validation_set(cfg: GrlmConfig, items: pa.Table, seqs: pa.Table, targets: pa.Table,
                         terms_t: pa.Table, tokenizer: Any) -> tuple[pa.Table, pa.Table]:
    """(queries, catalog): the seeded sample of validation users and every item's TID with its
    popularity rank (training interactions, as the evaluation's fallback)."""

    v = cfg.train.validation
    vcfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"split": "valid", "limit_users": v.users,
                                                                        "seed": v.seed})})
    qt = query_table(vcfg, items, seqs, targets, terms_t, tokenizer).select(
        ["user_id", "domain", "target_item_id", "prompt"])
    popular = training_popularity(seqs, targets)
    rank = {i: n for n, i in enumerate(popular)}
    ids = terms_t.column("item_id").to_pylist()
    catalog = pa.table({"item_id": pa.array(ids, pa.string()),
                        "terms": terms_t.column("terms").cast(pa.list_(pa.string())),
                        "popularity_rank": pa.array([rank.get(i, len(rank) + n) for n, i in enumerate(ids)], pa.int64())})
    return qt, catalog


class Validator:
    """Scores a model in memory on this rank's share of the validation users."""

    def __init__(self, queries: pa.Table, catalog: pa.Table, tokenizer: Any, *, num_beams: int, batch_size: int,
                 max_new_tokens: int, decay: str, match: str, rank: int, world: int, renormalize: bool = False) -> None:

        rows = queries.to_pylist()
        mine = rows[rank::world]
        lengths = [len(x) for x in tokenizer([r["prompt"] for r in mine], add_special_tokens=False)["input_ids"]]
        self.rows = [mine[j] for j in np.argsort(lengths, kind="stable")]  # similar lengths share a batch
        self.total = len(rows)
        ids = catalog.column("item_id").to_pylist()
        tids = catalog.column("terms").to_pylist()
        fallback = [ids[j] for j in np.argsort(catalog.column("popularity_rank").to_numpy(), kind="stable")]
        self.tid_texts = [tid_text(t) for t in tids]
        self.index = TidIndex(ids, tids, decay=decay, match=match, fallback_order=fallback)
        self.tokenizer = tokenizer
        self.opts = {"num_beams": num_beams, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                     "renormalize": renormalize}
        self._trie: Any = None

    def sums(self, model: Any) -> np.ndarray:
        """[users, R@5, N@5, R@10, N@10, valid beams, beams] summed over this rank's users."""
        import torch

        was_training, cache = model.training, model.config.use_cache
        model.eval()
        model.config.use_cache = True
        try:
            decoder = TidDecoder(None, self.tid_texts, model=model, tokenizer=self.tokenizer, constrained=True,
                                 num_beams=self.opts["num_beams"], max_new_tokens=self.opts["max_new_tokens"],
                                 renormalize=self.opts["renormalize"])
            with torch.inference_mode():
                return decode_sums(decoder, self.index, self.rows, self.opts["batch_size"])
        finally:
            model.config.use_cache = cache
            model.train(was_training)


def decode_sums(decoder: TidDecoder, index: TidIndex, rows: list[dict[str, Any]], batch_size: int,
                progress: Any = None) -> np.ndarray:
    """[users, R@5, N@5, R@10, N@10, valid beams, beams] summed over ``rows`` (prompt, target_item_id): each
    prompt's beams (any ``TidDecoder`` backend) grounded by ``index`` and scored (``reduce_metrics``)."""
    out = np.zeros(7)
    for s in range(0, len(rows), batch_size):
        batch = rows[s:s + batch_size]
        beams = decoder([r["prompt"] for r in batch], batch_size=len(batch))
        for r, texts in zip(batch, beams):
            ranked = index.rank(texts, max(KS)).items
            t = r["target_item_id"]
            out += [1, recall_at_k(ranked, t, 5), ndcg_at_k(ranked, t, 5), recall_at_k(ranked, t, 10),
                    ndcg_at_k(ranked, t, 10), sum(index.is_valid(x) for x in texts[:10]), len(texts[:10])]
        if progress is not None:
            progress(len(batch))
    return out


def reduce_metrics(sums: np.ndarray, world: int) -> dict[str, float]:
    """All-reduce the per-rank sums (when distributed) into the validation metrics."""
    import torch

    t = torch.tensor(sums, dtype=torch.float64)
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    s = t.tolist()
    n = max(1.0, s[0])
    return {"users": int(s[0]), "recall_at_5": s[1] / n, "ndcg_at_5": s[2] / n, "recall_at_10": s[3] / n,
            "ndcg_at_10": s[4] / n, "vr_at_10": s[5] / max(1.0, s[6])}


def plot_curve(points: list[dict[str, Any]], path: str, popularity: dict[str, float] | None = None) -> None:
    """R@10 and N@10 against training wall-clock and against epoch (two panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, x_key, label in ((axes[0], "train_minutes", "training wall-clock (min)"), (axes[1], "epoch", "epoch")):
        xs = [p[x_key] for p in points]
        ax.plot(xs, [p["recall_at_10"] for p in points], "o-", label="R@10")
        ax.plot(xs, [p["ndcg_at_10"] for p in points], "s-", label="N@10")
        if popularity:
            ax.axhline(popularity.get("recall_at_10", 0), color="grey", ls="--", lw=1, label="popularity R@10")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation")
    axes[0].legend(fontsize=8)
    best = max(points, key=lambda p: p["ndcg_at_10"]) if points else None
    if best:
        fig.suptitle(f"validation ({best['users']} users): best N@10 {best['ndcg_at_10']:.4f} / "
                     f"R@10 {best['recall_at_10']:.4f} at epoch {best['epoch']:.2f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def popularity_metrics(queries: pa.Table, catalog: pa.Table) -> dict[str, float]:
    """Popularity on the same validation users (a reference line for the curve)."""

    ids = catalog.column("item_id").to_pylist()
    top = [ids[j] for j in np.argsort(catalog.column("popularity_rank").to_numpy(), kind="stable")[:max(KS)]]
    targets = queries.column("target_item_id").to_pylist()
    n = max(1, len(targets))
    return {"recall_at_10": sum(recall_at_k(top, t, 10) for t in targets) / n,
            "ndcg_at_10": sum(ndcg_at_k(top, t, 10) for t in targets) / n}
