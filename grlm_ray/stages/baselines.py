"""Baselines on exactly GRLM's splits, test users and metric code: SASRec and popularity.

Contract: prepare/{sequences, targets} -> baseline/{predictions.parquet, metrics.json} (stage "baseline").

SASRec (Kang & McAuley 2018): item + learned position embeddings, causal self-attention blocks (pre-norm),
the next item scored against the (tied) item embeddings. ``baseline.loss: ce`` trains with full-softmax
cross-entropy over every item at every position (the strong variant); ``bce`` with one sampled negative
per position (the original, and the reference paper's baseline). Training sequences are the users' items
with every held-out target removed (``sft.training_sequences``, the same as IIFT's); a target's history
is every item before its position (its last ``max_len``), as in GRLM's evaluation, and the ranked list is
scored by ``grlm_ray.lib.metrics.score_rankings`` next to popularity on the same users.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, NamedTuple

import numpy as np
import pyarrow as pa

from grlm_ray.core.config import BaselineConfig, GrlmConfig
from grlm_ray.core.schemas import PREDICTIONS, SEQUENCES, TARGETS
from grlm_ray.core.run import Run
from grlm_ray.core.storage import StageContext, Store
from grlm_ray.lib.metrics import score_rankings
from grlm_ray.lib.protocol import popularity_ranking, select_targets
from grlm_ray.lib.textformat import domain_lookup, training_sequences

log = logging.getLogger(__name__)
STAGE = "baseline"


def _ligr_block(d: int, heads: int, dropout: float) -> Any:
    """A LiGR transformer block (LinkedIn's ranking layer, eSASRec's choice): pre-norm attention and a SwiGLU
    feed-forward (4d, no bias), each added to the residual stream through a sigmoid gate computed from the
    stream itself rather than added whole."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class LiGRBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm_attn, self.norm_ff = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, heads, dropout, batch_first=True)
            self.gate_attn, self.gate_ff = nn.Linear(d, d), nn.Linear(d, d)
            self.ff_gate, self.ff_up = nn.Linear(d, 4 * d, bias=False), nn.Linear(d, 4 * d, bias=False)
            self.ff_down = nn.Linear(4 * d, d, bias=False)
            self.drop_attn, self.drop_ff = nn.Dropout(dropout), nn.Dropout(dropout)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            a = self.norm_attn(x)
            a, _ = self.attn(a, a, a, attn_mask=mask, need_weights=False)
            x = x + torch.sigmoid(self.gate_attn(x)) * self.drop_attn(a)
            f = self.norm_ff(x)
            f = self.ff_down(F.silu(self.ff_gate(f)) * self.ff_up(f))
            return x + torch.sigmoid(self.gate_ff(x)) * self.drop_ff(f)

    return LiGRBlock()


def build_sasrec(n_items: int, c: BaselineConfig) -> Any:
    import torch
    from torch import nn

    class SASRec(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d = c.hidden_size
            self.item = nn.Embedding(n_items + 1, d, padding_idx=0)  # 0 = padding
            self.pos = nn.Embedding(c.max_len, d)
            self.drop = nn.Dropout(c.dropout)
            if c.layers == "ligr":
                self.blocks = nn.ModuleList([_ligr_block(d, c.num_heads, c.dropout) for _ in range(c.num_layers)])
            else:
                layer = nn.TransformerEncoderLayer(d, c.num_heads, d * 4, c.dropout, activation="gelu",
                                                   batch_first=True, norm_first=True)
                self.blocks = nn.TransformerEncoder(layer, c.num_layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)
            # small initial embeddings: with N(0, 1) ones the tied output logits start with std ~sqrt(d)
            # and full-softmax CE starts far above log(#items) (seen: 30.6 on Beauty)
            for emb in (self.item, self.pos):
                nn.init.normal_(emb.weight, std=0.02)
            with torch.no_grad():
                self.item.weight[0].zero_()

        def forward(self, seq: torch.Tensor) -> torch.Tensor:
            """seq [B, L] (left-padded with 0) -> hidden states [B, L, d]."""
            b, length = seq.shape
            x = self.item(seq) * math.sqrt(self.item.embedding_dim) + self.pos(torch.arange(length, device=seq.device))
            x = self.drop(x * (seq > 0).unsqueeze(-1))
            # causal, and no attention to padding; a position may always see itself (no empty rows)
            blocked = torch.triu(torch.ones(length, length, dtype=torch.bool, device=seq.device), 1)
            blocked = blocked.unsqueeze(0) | (seq == 0).unsqueeze(1)
            blocked &= ~torch.eye(length, dtype=torch.bool, device=seq.device).unsqueeze(0)
            mask = blocked.repeat_interleave(c.num_heads, dim=0)
            if c.layers == "ligr":
                for block in self.blocks:
                    x = block(x, mask)
                return self.norm(x)
            return self.norm(self.blocks(x, mask=mask))

        def scores(self, h: torch.Tensor) -> torch.Tensor:
            s = h @ self.item.weight.T
            s[..., 0] = float("-inf")
            return s

    return SASRec()


def _pad_left(seqs: list[list[int]], length: int) -> np.ndarray:
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-length:]
        if s:
            out[i, length - len(s):] = s
    return out


class SASRecFit(NamedTuple):
    model: Any
    losses: list[float]  # mean training loss per epoch run
    curve: list[dict[str, Any]]  # validation points: epoch, seconds (training only), loss, metrics
    best_epoch: int | None  # the epoch whose weights were kept (None: no validation, the last one)
    seconds: float  # training seconds, validation excluded


def _batch_loss(model: Any, h: Any, y: Any, c: BaselineConfig, n_items: int, rng: np.random.Generator) -> Any:
    """The training loss of one batch: hidden states ``h`` [B, L, d], next items ``y`` [B, L] (0 = none)."""
    import torch
    import torch.nn.functional as F

    keep = y > 0
    hk, pos = h[keep], y[keep]
    if c.loss == "ce":
        return F.cross_entropy(model.scores(hk), pos)
    if c.loss == "sampled":
        neg = torch.from_numpy(rng.integers(1, n_items + 1, size=c.negatives))
        pos_s = (hk * model.item(pos)).sum(-1, keepdim=True)
        neg_s = (hk @ model.item(neg).T).masked_fill(neg.unsqueeze(0) == pos.unsqueeze(1), float("-inf"))
        return F.cross_entropy(torch.cat([pos_s, neg_s], 1), torch.zeros(len(pos), dtype=torch.long))
    neg = torch.from_numpy(rng.integers(1, n_items + 1, size=tuple(y.shape)))[keep]
    pos_s = (hk * model.item(pos)).sum(-1)
    neg_s = (hk * model.item(neg)).sum(-1)
    return F.binary_cross_entropy_with_logits(torch.cat([pos_s, neg_s]),
                                              torch.cat([torch.ones_like(pos_s), torch.zeros_like(neg_s)]))


def train_sasrec(train_seqs: list[list[int]], n_items: int, c: BaselineConfig, progress: bool = True,
                 validate: Callable[[Any], dict[str, float]] | None = None,
                 checkpoint: Callable[[dict[str, Any]], None] | None = None,
                 resume: dict[str, Any] | None = None) -> SASRecFit:
    """Train on index sequences (items 1..n_items), a next-item target at every position. ``validate``
    (model in eval mode -> metrics) runs every ``c.validation.every_epochs`` epochs; the best epoch's weights
    by ``c.validation.metric`` are kept and ``c.validation.patience`` stops training early. ``checkpoint``
    gets the whole training state after every epoch; ``resume`` (such a state) continues from it exactly as
    the uninterrupted run would have (weights, optimizer, both random generators, curve, best so far)."""
    import copy

    import torch
    from tqdm import tqdm

    if c.threads:
        torch.set_num_threads(c.threads)
    torch.manual_seed(c.seed)
    rng = np.random.default_rng(c.seed)
    model = build_sasrec(n_items, c)
    opt = torch.optim.AdamW(model.parameters(), lr=c.learning_rate, weight_decay=c.weight_decay)
    usable = [s for s in train_seqs if len(s) >= 2]
    inputs = _pad_left([s[:-1] for s in usable], c.max_len)
    labels = _pad_left([s[1:] for s in usable], c.max_len)
    v = c.validation
    losses: list[float] = []
    curve: list[dict[str, Any]] = []
    best, best_state, best_epoch, since = -1.0, None, None, 0
    train_s = 0.0
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["torch_rng"])
        rng.bit_generator.state = resume["numpy_rng"]
        losses, curve, best_state = list(resume["losses"]), list(resume["curve"]), resume["best_state"]
        best, best_epoch, since, train_s = resume["best"], resume["best_epoch"], resume["since"], resume["train_s"]
        start = resume["epoch"]
        log.info("sasrec: resuming after epoch %d of %d (best %s at epoch %s)", start, c.epochs, best, best_epoch)
        if resume.get("stopped"):  # it had stopped early: nothing left to train
            start = c.epochs
    bar = tqdm(range(start, c.epochs), desc=f"sasrec-{c.loss}", disable=not progress, initial=start, total=c.epochs)
    for epoch in bar:
        t0 = time.time()
        model.train()
        order = rng.permutation(len(usable))
        total, count = 0.0, 0
        for s in range(0, len(order), c.batch_size):
            idx = order[s:s + c.batch_size]
            x, y = torch.from_numpy(inputs[idx]), torch.from_numpy(labels[idx])
            loss = _batch_loss(model, model(x), y, c, n_items, rng)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        losses.append(total / max(1, count))
        train_s += time.time() - t0
        log.debug("sasrec epoch %d loss %.4f", epoch, losses[-1])
        stop = False
        if validate is not None and ((epoch + 1) % v.every_epochs == 0 or epoch + 1 == c.epochs):
            model.eval()
            metrics = validate(model)
            curve.append({"epoch": epoch + 1, "seconds": round(train_s, 2), "train_minutes": round(train_s / 60, 3),
                          "loss": round(losses[-1], 4),
                          **{k: round(float(x), 6) for k, x in metrics.items() if isinstance(x, (int, float))}})
            bar.set_postfix({v.metric: f"{metrics[v.metric]:.4f}"})
            if metrics[v.metric] > best:
                best, best_epoch, since = metrics[v.metric], epoch + 1, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since += 1
                stop = v.patience is not None and since >= v.patience
        if checkpoint is not None:
            checkpoint({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "torch_rng": torch.get_rng_state(), "numpy_rng": rng.bit_generator.state,
                        "losses": losses, "curve": curve, "best_state": best_state, "best": best,
                        "best_epoch": best_epoch, "since": since, "train_s": train_s, "stopped": stop})
        if stop:
            log.info("sasrec: %d validations without a better %s: stopped after epoch %d (best %d)",
                     since, v.metric, epoch + 1, best_epoch)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return SASRecFit(model.eval(), losses, curve, best_epoch, train_s)


def recommend(model: Any, histories: list[list[int]], k: int, max_len: int, batch_size: int = 256) -> np.ndarray:
    """Top-k item indices (1-based) for each history, best first (history items are not masked). ``model``:
    one SASRec, or a list of them ranking by the mean of their log-softmax scores (``baseline.ensemble``)."""
    import torch

    models = model if isinstance(model, list) else [model]
    out = []
    with torch.inference_mode():
        for s in range(0, len(histories), batch_size):
            x = torch.from_numpy(_pad_left(histories[s:s + batch_size], max_len))
            if len(models) == 1:
                scores = models[0].scores(models[0](x)[:, -1])
            else:
                scores = torch.stack([torch.log_softmax(m.scores(m(x)[:, -1]).float(), -1) for m in models]).mean(0)
            out.append(torch.topk(scores, k, dim=-1).indices.numpy())
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


def _trained_sasrec(store: Store, cfg: GrlmConfig, seqs: list[list[int]], n_items: int,
                    validate: Callable[[Any], dict[str, float]] | None) -> tuple[SASRecFit, str | None]:
    """Train SASRec, or load the model an earlier run trained on the same data with the same settings
    (``<root>/_cache/sasrec-<hash of data + baseline sections + sequences>/``): scoring another set of
    test users (sample vs full mode) does not retrain. Returns (the fit, the cache path if loaded)."""
    import hashlib
    import io
    import json

    import torch

    digest = hashlib.sha256(json.dumps(seqs, separators=(",", ":")).encode()).hexdigest()[:12]
    rel = f"_cache/sasrec-{cfg.section_hash('data', 'baseline')}-{digest}"
    if store.exists(f"{rel}/info.json") and store.exists(f"{rel}/model.pt"):
        info = store.read_json(f"{rel}/info.json")
        model = build_sasrec(n_items, cfg.baseline)
        model.load_state_dict(torch.load(io.BytesIO(store.read_bytes(f"{rel}/model.pt")), weights_only=True))
        log.info("baseline: SASRec loaded from %s (trained in %.0f s)", store.uri(rel), info["train_seconds"])
        fit = SASRecFit(model.eval(), info["losses"], info.get("curve", []), info.get("best_epoch"),
                        info["train_seconds"])
        return fit, store.uri(rel)
    # an interrupted training (a killed job) continues from its last epoch: the state after every epoch
    ckpt = f"{rel}/checkpoint.pt"
    resume = None
    if store.exists(ckpt):
        resume = torch.load(io.BytesIO(store.read_bytes(ckpt)), weights_only=False)

    def save(state: dict[str, Any]) -> None:
        b = io.BytesIO()
        torch.save(state, b)
        store.write_bytes(ckpt, b.getvalue())  # atomic: a kill mid-write leaves the previous epoch's

    fit = train_sasrec(seqs, n_items, cfg.baseline, progress=cfg.ray.progress_bars, validate=validate,
                       checkpoint=save, resume=resume)
    buf = io.BytesIO()
    torch.save(fit.model.state_dict(), buf)
    store.write_bytes(f"{rel}/model.pt", buf.getvalue())
    store.write_json(f"{rel}/info.json", {"losses": fit.losses, "train_seconds": fit.seconds, "items": n_items,
                                          "curve": fit.curve, "best_epoch": fit.best_epoch,
                                          "resumed_after_epoch": resume["epoch"] if resume else None})
    store.delete_file(ckpt)
    return fit, None


def baseline_stage(cfg: GrlmConfig) -> dict[str, Any]:
    run = Run.of(cfg)
    c, e = cfg.baseline, cfg.eval

    def body(ctx: StageContext) -> None:
        seqs = ctx.read("sequences.parquet", SEQUENCES, stage="prepare")
        targets = ctx.read("targets.parquet", TARGETS, stage="prepare")
        train = training_sequences(seqs, targets)
        items = sorted({i for s in seqs.column("item_ids").to_pylist() for i in s})
        index = {it: n + 1 for n, it in enumerate(items)}
        by_user = dict(zip(seqs.column("user_id").to_pylist(), seqs.column("item_ids").to_pylist()))
        domain_of = domain_lookup(cfg)

        def scored(rows_t: list[dict[str, Any]], model: Any) -> list[dict[str, Any]]:
            """Each target row with the model's top max(ks) items (its history: every item before it)."""
            histories = [[index[i] for i in by_user[r["user_id"]][: r["position"]]] for r in rows_t]
            top = recommend(model, histories, max(e.ks), c.max_len)
            return [{"user_id": r["user_id"], "split": r["split"], "domain": r["domain"] or domain_of(r["target_item_id"]),
                     "target_item_id": r["target_item_id"], "candidates": [],
                     "ranked_item_ids": [items[j - 1] for j in ranked], "grounded_by": []} for r, ranked in zip(rows_t, top)]

        validate: Callable[[Any], dict[str, float]] | None = None
        if c.validation.users:  # the valid targets of the users train.validation samples with these settings
            valid_t = select_targets(targets, "valid", c.validation.users, c.validation.seed)
            validate = lambda model: score_rankings(scored(valid_t, model), e.ks)["overall"]  # noqa: E731

        train_seqs = [[index[i] for i in s] for s in train.values()]
        members = []  # baseline.ensemble: each member trained (or loaded) exactly as a run with its seed would be
        for n in range(c.ensemble):
            mc = cfg.model_copy(update={"baseline": c.model_copy(update={"seed": c.seed + n, "ensemble": 1})})
            members.append(_trained_sasrec(run.store, mc, train_seqs, len(items), validate))
        (fit, cached), models = members[0], [f.model for f, _ in members]
        rows_t = select_targets(targets, e.split, e.limit_users, e.seed)
        t0 = time.time()
        rows = scored(rows_t, models)
        eval_s = time.time() - t0
        popular = popularity_ranking(train)[: max(e.ks)]
        pop_rows = [{"domain": r["domain"], "target_item_id": r["target_item_id"], "ranked_item_ids": popular,
                     "grounded_by": []} for r in rows]
        ctx.write("predictions.parquet", pa.Table.from_pylist(rows, schema=PREDICTIONS.arrow), PREDICTIONS)
        metrics, baseline = score_rankings(rows, e.ks), score_rankings(pop_rows, e.ks)
        for m in (metrics["overall"], baseline["overall"]):  # direct hits are a GRLM notion
            for key in [k for k in m if k.startswith("dhr_")]:
                del m[key]
        report = {"model": metrics, "popularity": baseline, "protocol": {
            "model": f"SASRec ({c.loss})" + (f", ensemble of {c.ensemble} seeds" if c.ensemble > 1 else ""),
            "split": e.split, "users": len(rows), "sample": e.limit_users,
            "seed": e.seed, "history_masked": False, "ks": list(e.ks), "config": c.model_dump(mode="json")}}
        ctx.store.write_json(ctx.rel("metrics.json"), report)
        ctx.info.update({"metrics": metrics["overall"], "popularity": baseline["overall"],
                         "per_domain": metrics["per_domain"], "protocol": report["protocol"],
                         "loss_first": round(fit.losses[0], 4), "loss_last": round(fit.losses[-1], 4),
                         "losses": [round(x, 4) for x in fit.losses], "train_seconds": round(sum(f.seconds for f, _ in members), 2),
                         "epochs_run": len(fit.losses), "best_epoch": fit.best_epoch, "validation_curve": fit.curve,
                         "model_cache": cached,
                         **({"ensemble": [{"seed": c.seed + n, "train_seconds": round(f.seconds, 2),
                                           "best_epoch": f.best_epoch, "epochs_run": len(f.losses),
                                           "validation_curve": f.curve} for n, (f, _) in enumerate(members)]}
                            if c.ensemble > 1 else {}),
                         "eval_seconds": round(eval_s, 2), "items": len(items), "train_users": len(train)})

    return run.run_stage(STAGE, body, inputs={"sequences": ("prepare", "sequences.parquet")})
