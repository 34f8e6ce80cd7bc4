"""One training worker, as a recipe: ``LoopConfig`` (typed: everything a worker gets from the driver) ->
``Recipe``: ``setup`` (data, model, optimizer, scheduler, weight average), ``resume`` (the newest checkpoint),
``train`` (the loop). The parts it is made of live beside it and are tested one by one: the model and its
optimizer (``build_model``), checkpoints (``CheckpointIO``), validation during training (``ValidationLoop``),
the training clock (``TrainClock``) and the progress reports (``Progress``).

``train_loop(config, session)`` is what Ray Train's ``TorchTrainer`` (or ``train.strategy=single``) runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from grlm_ray.core import faults
from grlm_ray.core.config import S3Config, TrainConfig
from grlm_ray.core.errors import ConfigError
from grlm_ray.core.storage import Store
from grlm_ray.lib.models import load_tokenizer, quiet_loading
from grlm_ray.lib.tokens import collate
from grlm_ray.lib.validation import Validator, reduce_metrics
from grlm_ray.stages.train.modules import WeightEMA, add_residual_dropout, label_positions_lm, optimizer_digest
from grlm_ray.stages.train.schedule import lr_factor
from grlm_ray.stages.train.sessions import CKPT_TAG, EMA_FILE, RaySession, seal_checkpoint


class ValidationSpec(BaseModel):
    """Where the validation users and catalog are, how to score them (the evaluation's settings)."""

    model_config = ConfigDict(extra="forbid")
    queries_rel: str
    catalog_rel: str
    curve_rel: str
    best_rel: str
    max_new_tokens: int
    decay: str  # eval.decay
    match: str
    renormalize: bool = False
    popularity: dict[str, Any] = {}


class LoopConfig(BaseModel):
    """What the driver hands every worker (``TorchTrainer``'s ``train_loop_config``, a plain dict on the wire)."""

    model_config = ConfigDict(extra="forbid")
    train: TrainConfig
    root: str
    s3: S3Config
    base_rel: str
    tokens_rel: str
    packed: bool
    pad_id: int
    plan: dict[str, int]  # rows_per_step, accum, steps_per_epoch, total_steps (``plan_steps``)
    deepspeed: dict[str, Any] | None = None
    mlflow: dict[str, str] | None = None  # uri, run_id
    threads: int = 1
    validation: ValidationSpec | None = None
    dropout: float = 0.0
    ray_run_rel: str | None = None  # the Ray Train run's folder in the store (stopped jobs' checkpoints)
    faults: Any = None  # tests only (GRLM_FAULTS)
    verbose: bool = False


@dataclass
class Model:
    """The model as each piece of the loop needs it: ``hf`` (the HF model: saved, averaged, validated),
    ``module`` (what the forward runs: DDP-wrapped, or the DeepSpeed engine), the optimizer and scheduler."""

    hf: Any
    module: Any
    optimizer: Any
    scheduler: Any
    engine: Any  # the DeepSpeed engine, or None
    ema: WeightEMA | None
    device: Any
    partitioned: bool  # ZeRO partitions the optimizer state over ranks

    def averaged(self) -> Any:
        """The weights to validate and export: the weight average swapped in, when there is one."""
        return self.ema.applied(self.hf) if self.ema is not None else contextlib.nullcontext(self.hf)


def build_model(lc: LoopConfig, base_dir: str, session: Any) -> Model:
    """The backbone from ``base_dir`` (fp32), residual dropout, AdamW (no decay on vectors), the warm-up +
    cosine schedule, DeepSpeed or the session's DDP wrapper, the weight average."""
    import torch
    from transformers import AutoModelForCausalLM

    t, total = lc.train, lc.plan["total_steps"]
    device = session.device(t.use_gpu)
    hf_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    hf_model.config.use_cache = False
    add_residual_dropout(hf_model, lc.dropout)
    model = label_positions_lm(hf_model) if t.selective_logits else hf_model
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.learning_rate)
    warmup = int(t.warmup_ratio * total)

    def sched_fn(opt: Any) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, t.min_lr_ratio))

    engine = None
    if t.strategy == "deepspeed":
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=sched_fn, config=lc.deepspeed, dist_init_required=False)
        module = engine
    else:
        model.to(device)
        scheduler = sched_fn(optimizer)
        module = session.prepare(model)
    ema = WeightEMA(hf_model, t.ema_decay) if t.ema_decay else None
    return Model(hf_model, module, optimizer, scheduler, engine, ema, device,
                 partitioned=t.strategy == "deepspeed" and t.deepspeed.zero_stage >= 1)


class TrainClock:
    """Seconds spent training (validation excluded), carried across resumes."""

    def __init__(self) -> None:
        self.offset, self.t0, self.excluded = 0.0, time.time(), 0.0

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def __call__(self) -> float:
        return round(self.offset + time.time() - self.t0 - self.excluded, 2)


@dataclass
class Resumed:
    """Where a resumed run starts, and the optimizer digests that prove its state came back whole."""

    step: int
    first_loss: float | None
    first_grad_norm: float | None
    validation: dict[str, Any]
    train_seconds: float
    digest_saved: float
    digest_loaded: float


class CheckpointIO:
    """Save and restore everything a run needs to continue: model, optimizer, scheduler (or the DeepSpeed
    engine's shards), the weight average, each rank's RNG, the step, validation state and the clock."""

    def __init__(self, lc: LoopConfig, m: Model, rank: int, world: int) -> None:
        self.t, self.m, self.rank, self.world = lc.train, m, rank, world
        self.total_steps = lc.plan["total_steps"]

    def restore(self, ckpt: Any) -> Resumed:
        import torch

        m, d_ = self.m, self.m.device
        with ckpt.as_directory() as d:
            meta = json.load(open(os.path.join(d, "meta.json")))
            if m.engine is not None:
                m.engine.load_checkpoint(d, tag=CKPT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
            else:
                m.hf.load_state_dict(torch.load(os.path.join(d, "model.pt"), map_location=d_))
                m.optimizer.load_state_dict(torch.load(os.path.join(d, "optimizer.pt"), map_location=d_))
                m.scheduler.load_state_dict(torch.load(os.path.join(d, "scheduler.pt")))
            if m.ema is not None:
                if not os.path.exists(os.path.join(d, EMA_FILE)):
                    raise ConfigError(f"train.ema_decay is set but checkpoint {ckpt.path} has no {EMA_FILE}: "
                                      "it was written without a weight average; resume with the same train config")
                m.ema.load_state_dict(torch.load(os.path.join(d, EMA_FILE), map_location=d_))
            rng_file = os.path.join(d, f"rng_rank{self.rank}.pt")
            if os.path.exists(rng_file):
                torch.set_rng_state(torch.load(rng_file))
        return Resumed(int(meta["step"]), meta.get("first_loss"), meta.get("first_grad_norm"),
                       meta.get("validation") or {}, float(meta.get("train_seconds") or 0.0), meta["optimizer_digest"],
                       optimizer_digest(m.optimizer, m.partitioned))

    def save(self, session: Any, step: int, metrics: dict[str, Any], meta: dict[str, Any]) -> None:
        """One checkpoint folder per rank (Ray Train merges them), sealed, reported with ``metrics``."""
        import torch

        m, t, rank = self.m, self.t, self.rank
        with tempfile.TemporaryDirectory(prefix="grlm-ckpt-") as d:
            if m.engine is not None:
                m.engine.save_checkpoint(d, tag=CKPT_TAG, client_state={"step": step})
            elif rank == 0:
                torch.save(m.hf.state_dict(), os.path.join(d, "model.pt"))
                torch.save(m.optimizer.state_dict(), os.path.join(d, "optimizer.pt"))
                torch.save(m.scheduler.state_dict(), os.path.join(d, "scheduler.pt"))
            if m.ema is not None and rank == 0:
                torch.save(m.ema.state_dict(), os.path.join(d, EMA_FILE))
            torch.save(torch.get_rng_state(), os.path.join(d, f"rng_rank{rank}.pt"))
            digest = optimizer_digest(m.optimizer, m.partitioned)
            if rank == 0:
                with open(os.path.join(d, "meta.json"), "w") as f:
                    json.dump({"step": step, "world": self.world, "optimizer_digest": digest, "strategy": t.strategy,
                               "first_loss": meta["first_loss"], "first_grad_norm": meta.get("first_grad_norm"),
                               "zero_stage": t.deepspeed.zero_stage if m.engine is not None else None,
                               "validation": meta["validation"], "train_seconds": meta["train_seconds"],
                               "total_steps": self.total_steps}, f)
            seal_checkpoint(d, rank)
            # every rank reports its own folder: Ray Train merges them into one checkpoint
            session.report({**metrics, "optimizer_digest": digest}, checkpoint_dir=d)


@dataclass
class ValidationLoop:
    """Validation users scored during training (every rank its share, reduced): the learning curve, the
    best weights so far (rank 0 saves them for export), early stopping after ``patience`` validations
    without a better ``metric``."""

    spec: ValidationSpec
    validator: Validator
    steps: set[int]
    state: dict[str, Any] = field(default_factory=lambda: ValidationLoop.fresh_state())

    @staticmethod
    def fresh_state() -> dict[str, Any]:
        """What validation has seen before the first point (checkpointed with the weights)."""
        return {"best": None, "best_step": None, "since_best": 0, "points": []}

    @classmethod
    def build(cls, lc: LoopConfig, store: Store, base_dir: str, rank: int, world: int) -> "ValidationLoop | None":
        import pyarrow.parquet as pq

        spec, t = lc.validation, lc.train
        if spec is None:
            return None
        v = t.validation
        validator = Validator(pq.read_table(store.path(spec.queries_rel), filesystem=store.fs),
                              pq.read_table(store.path(spec.catalog_rel), filesystem=store.fs),
                              load_tokenizer(base_dir), num_beams=v.num_beams, batch_size=v.batch_size,
                              max_new_tokens=spec.max_new_tokens, decay=spec.decay, match=spec.match, rank=rank,
                              world=world, renormalize=spec.renormalize)
        total, spe = lc.plan["total_steps"], lc.plan["steps_per_epoch"]
        steps = set()
        if v.every_steps:
            steps.update(range(v.every_steps, total + 1, v.every_steps))
        if v.every_epochs:
            k = max(1, round(v.every_epochs * spe))
            steps.update(range(k, total + 1, k))
        steps.add(total)
        return cls(spec, validator, steps)

    def score(self, m: Model, world: int) -> tuple[dict[str, Any], float]:
        t0 = time.time()
        with m.averaged() as scored:
            res = reduce_metrics(self.validator.sums(scored), world)
        return res, time.time() - t0

    def record(self, done: int, epoch: float, minutes: float, res: dict[str, Any], took: float,
               metric: str, tokens: int | None = None) -> tuple[dict[str, Any], bool]:
        """A validation point into the curve; whether it is the best so far."""
        point = {"step": done, "epoch": round(epoch, 4), "train_minutes": round(minutes, 3), "seconds": round(took, 2),
                 **({} if tokens is None else {"train_tokens": tokens}),
                 **{k: round(x, 6) if isinstance(x, float) else x for k, x in res.items()}}
        self.state["points"].append(point)
        better = self.state["best"] is None or res[metric] > self.state["best"]
        if better:
            self.state.update(best=res[metric], best_step=done, since_best=0)
        else:
            self.state["since_best"] += 1
        return point, better

    def save_best(self, m: Model, store: Store, done: int, point: dict[str, Any]) -> None:
        """The best weights so far, in the checkpoint layout ``export_model`` reads (rank 0, full weights)."""
        import torch

        with m.averaged() as weights, tempfile.TemporaryDirectory(prefix="grlm-best-") as d:
            torch.save({k: x.detach().float().cpu() for k, x in weights.state_dict().items()},
                       os.path.join(d, "model.pt"))
            with open(os.path.join(d, "meta.json"), "w") as f:
                json.dump({"step": done, "strategy": "ddp", "validation": point}, f)
            store.upload_dir(d, self.spec.best_rel)


class Progress:
    """Throughput windows, the console line (about 5 per training, and at least every ``CONSOLE_S`` seconds
    of a long one; every window with ``grlm -v``) and the MLflow metrics (rank 0)."""

    CONSOLE_S = 300.0

    def __init__(self, lc: LoopConfig, rank: int, world: int) -> None:
        t, total = lc.train, lc.plan["total_steps"]
        self.rank, self.world, self.total, self.log_every = rank, world, total, t.log_every
        self.console_every = t.log_every * max(1, -(-total // (5 * t.log_every))) if not lc.verbose else t.log_every
        self.tokens = self.samples = 0
        self.t0 = self.last_line = time.time()
        self.client, self.run_id = None, None
        if rank == 0 and lc.mlflow:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(lc.mlflow["uri"]), lc.mlflow["run_id"]

    def log(self, key: str, value: float, step: int) -> None:
        if self.client is not None:
            self.client.log_metric(self.run_id, key, float(value), step=step)

    def count(self, tokens: int, samples: int) -> None:
        self.tokens += tokens
        self.samples += samples

    def pause(self, seconds: float) -> None:
        """Time that is not training (validation): out of the throughput window."""
        self.t0 += seconds

    def window(self, done: int, epoch: int, metrics: dict[str, Any]) -> None:
        """At the end of a log window: throughput into ``metrics``, the console line, MLflow."""
        if not (done % self.log_every == 0 or done == self.total):
            return
        elapsed = max(1e-9, time.time() - self.t0)
        # every rank processes the same number of rows per step: scale this rank's count by world
        metrics["tokens_per_s"] = self.tokens * self.world / elapsed
        metrics["samples_per_s"] = self.samples * self.world / elapsed
        self.tokens, self.samples, self.t0 = 0, 0, time.time()
        now = self.t0
        if self.rank == 0 and (done == self.total or done % self.console_every == 0
                               or now - self.last_line >= self.CONSOLE_S):
            self.last_line = now
            sys.stdout.write(f"[iift] step {done}/{self.total} epoch {epoch} loss {metrics['loss']:.4f} "
                             f"lr {metrics['lr']:.2e} tokens/s {metrics['tokens_per_s']:.0f}\n")
            sys.stdout.flush()
        for k in ("loss", "lr", "tokens_per_s", "samples_per_s", "grad_norm"):
            if metrics.get(k) is not None:
                self.log(f"train/{k}", metrics[k], done)


class Recipe:
    """One worker's training: ``setup()``, ``resume()``, ``train()``."""

    def __init__(self, lc: LoopConfig, session: Any) -> None:
        self.lc, self.t, self.session = lc, lc.train, session
        self.rank, self.world = session.rank, session.world
        self.store = Store(lc.root, lc.s3)

    def setup(self) -> None:
        import pyarrow.parquet as pq
        import torch

        lc, t = self.lc, self.t
        torch.set_num_threads(max(1, lc.threads))
        torch.manual_seed(t.seed + self.rank)
        self.base_dir = self.store.local_dir(lc.base_rel, tempfile.mkdtemp(prefix="grlm-train-"))
        self.data = pq.read_table(self.store.path(lc.tokens_rel), filesystem=self.store.fs).to_pylist()
        self.m = build_model(lc, self.base_dir, self.session)
        self.io = CheckpointIO(lc, self.m, self.rank, self.world)
        self.clock = TrainClock()
        self.start, self.first_loss, self.resumed = 0, None, None
        self.grad_norm: float | None = None  # the last step's global gradient norm, before clipping
        self.first_grad_norm: float | None = None  # the run's first step's (strategies compare on it; kept on resume)
        self.val_state: dict[str, Any] = ValidationLoop.fresh_state()

    def resume(self) -> None:
        """From the session's newest checkpoint, if there is one."""
        self.ckpt = self.session.checkpoint()
        if self.ckpt is None:
            return
        r = self.resumed = self.io.restore(self.ckpt)
        self.start, self.first_loss, self.clock.offset = r.step, r.first_loss, r.train_seconds
        self.first_grad_norm = r.first_grad_norm
        self.val_state.update(r.validation)

    def order(self, epoch: int) -> Any:
        """The epoch's row order, seeded. Packed rows are shuffled one by one; padded rows (sorted by
        length) are shuffled in whole micro batches, so each micro batch keeps similar lengths."""
        import numpy as np

        rng, n, mb = np.random.default_rng(self.t.seed + epoch), len(self.data), self.t.micro_batch
        if self.lc.packed:
            return rng.permutation(n)
        chunks = [np.arange(s, min(s + mb, n)) for s in range(0, n, mb)]
        return np.concatenate([chunks[j] for j in rng.permutation(len(chunks))])

    def tokens_through(self, done: int) -> int:
        """Real (non-padding) training tokens of the first ``done`` steps, every rank's: exact, from the seeded
        order (the same on every rank and across resumes), so curves compare trainings at equal tokens."""
        import numpy as np

        if getattr(self, "_lengths", None) is None:
            self._lengths = np.fromiter((int(r["length"]) for r in self.data), dtype=np.int64, count=len(self.data))
            self._epoch_tokens: dict[int, int] = {}
        spe, rps = self.lc.plan["steps_per_epoch"], self.lc.plan["rows_per_step"]
        full, pos = divmod(done, spe)
        for e in range(full):
            if e not in self._epoch_tokens:
                self._epoch_tokens[e] = int(self._lengths[self.order(e)[:spe * rps]].sum())
        return sum(self._epoch_tokens[e] for e in range(full)) + int(self._lengths[self.order(full)[:pos * rps]].sum())

    def forward_precision(self) -> Any:
        """bf16 autocast for ddp / single (weights, optimizer state and loss stay fp32); DeepSpeed casts itself."""
        import torch

        if self.t.precision == "bf16" and self.m.engine is None:
            return torch.autocast(self.m.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, step: int) -> tuple[float, list[int]]:
        """One optimizer step over this rank's share of the step's rows: (mean loss, the rows)."""
        import torch

        t, m, plan = self.t, self.m, self.lc.plan
        accum, rows_per_step = plan["accum"], plan["rows_per_step"]
        epoch, pos = divmod(step, plan["steps_per_epoch"])
        step_rows = self.order(epoch)[pos * rows_per_step:(pos + 1) * rows_per_step]
        per_rank = rows_per_step // self.world  # a multiple of micro_batch: micro batches stay whole
        mine = step_rows[self.rank * per_rank:(self.rank + 1) * per_rank]
        loss_sum = 0.0
        for a in range(accum):
            batch = collate([self.data[i] for i in mine[a * t.micro_batch:(a + 1) * t.micro_batch]], self.lc.packed,
                            self.lc.pad_id)
            batch = {k: v.to(m.device) for k, v in batch.items()}
            if m.engine is not None:
                out = m.engine(**batch)
                m.engine.backward(out.loss)
                m.engine.step()
            else:
                sync = a == accum - 1 or self.world == 1
                no_sync = not sync and hasattr(m.module, "no_sync")
                with m.module.no_sync() if no_sync else contextlib.nullcontext():  # backward inside: no all-reduce
                    with self.forward_precision():
                        out = m.module(**batch)
                    (out.loss / accum).backward()
            loss_sum += float(out.loss.detach())
        if m.engine is None:
            # the global gradient norm (after DDP's all-reduce), clipped at grad_clip (0: not clipped)
            norm = torch.nn.utils.clip_grad_norm_(m.module.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
            self.grad_norm = float(norm)
            m.optimizer.step()
            m.scheduler.step()
            m.optimizer.zero_grad(set_to_none=True)
        else:
            norm = m.engine.get_global_grad_norm()  # ZeRO computes it at the accumulation boundary
            self.grad_norm = None if norm is None else float(norm)
        if m.ema is not None:
            m.ema.update(m.hf)
        return loss_sum / accum, list(mine)

    def validate(self, val: ValidationLoop, progress: Progress, done: int, metrics: dict[str, Any]) -> bool:
        """Score the validation users; True when training should stop (patience exhausted)."""
        vcfg = self.t.validation
        res, took = val.score(self.m, self.world)
        self.clock.exclude(took)
        point, better = val.record(done, done / self.lc.plan["steps_per_epoch"], self.clock() / 60, res, took,
                                   vcfg.metric, tokens=self.tokens_through(done))
        if better and self.rank == 0:
            val.save_best(self.m, self.store, done, point)
        s = val.state
        metrics.update({f"val_{k}": x for k, x in res.items() if k != "users"})
        metrics["val_best"] = s["best"]
        if self.rank == 0:
            self.store.write_json(val.spec.curve_rel, s["points"])
            sys.stdout.write(f"[iift] validation step {done} epoch {point['epoch']:.2f}: R@10 {res['recall_at_10']:.4f} "
                             f"N@10 {res['ndcg_at_10']:.4f} VR@10 {res['vr_at_10']:.3f} ({res['users']} users, "
                             f"{took:.0f} s); best {vcfg.metric} {s['best']:.4f} at step {s['best_step']}\n")
            sys.stdout.flush()
            for k, x in res.items():
                progress.log(f"val/{k}", x, done)
            progress.log("val/train_minutes", point["train_minutes"], done)
        return bool(vcfg.patience and s["since_best"] >= vcfg.patience)

    def train(self) -> None:
        t, total, spe = self.t, self.lc.plan["total_steps"], self.lc.plan["steps_per_epoch"]
        progress = Progress(self.lc, self.rank, self.world)
        if self.resumed:
            progress.log("train/resumed_from_step", self.resumed.step, self.start)
        val = ValidationLoop.build(self.lc, self.store, self.base_dir, self.rank, self.world)
        if val is not None:
            val.state = self.val_state
        fail_rank = min(1, self.world - 1)
        self.m.module.train()
        for step in range(self.start, total):
            if faults.due(self.lc.faults, "train_step", step) and self.rank == fail_rank and self.ckpt is None:
                faults.crash("train_step", step, f"training rank {self.rank}")
            loss, mine = self.train_step(step)
            progress.count(sum(int(self.data[i]["length"]) for i in mine),  # real (non-padding) tokens
                           sum(int(self.data[i]["samples"]) for i in mine))
            done, epoch = step + 1, step // spe
            self.first_loss = loss if self.first_loss is None else self.first_loss
            if self.first_grad_norm is None:
                self.first_grad_norm = self.grad_norm
            metrics = {"step": done, "epoch": epoch, "loss": loss, "first_loss": self.first_loss,
                       "grad_norm": self.grad_norm, "first_grad_norm": self.first_grad_norm,
                       "lr": float(self.m.scheduler.get_last_lr()[0]) if hasattr(self.m.scheduler, "get_last_lr")
                       else t.learning_rate}
            if self.resumed:
                metrics.update({"resumed_from_step": self.resumed.step, "digest_saved": self.resumed.digest_saved,
                                "digest_loaded": self.resumed.digest_loaded})
            progress.window(done, epoch, metrics)
            stop, t_v = False, time.time()
            if val is not None and done in val.steps:
                stop = self.validate(val, progress, done, metrics)
                progress.pause(time.time() - t_v)  # throughput windows exclude validation
            if done % t.checkpoint_every == 0 or done == total or (val is not None and done in val.steps):
                metrics["train_seconds"] = self.clock()  # the loop's clock, carried across resumes
                self.io.save(self.session, done, metrics, {"first_loss": self.first_loss,
                                                           "first_grad_norm": self.first_grad_norm,
                                                           "validation": self.val_state,
                                                           "train_seconds": metrics["train_seconds"]})
            elif done % t.log_every == 0:
                # not every step: Ray Train V2 hands a report to the controller through a one-slot queue that it
                # drains on its own poll interval, so a report per step throttled training to that interval
                # (31 samples/s on Beauty with workers ~30% busy; py-spy: blocked in TrainContext._wait_then_report)
                self.session.report(metrics)
            if stop:
                if self.rank == 0:
                    sys.stdout.write(f"[iift] early stop at step {done}: no better {t.validation.metric} in "
                                     f"{t.validation.patience} validations\n")
                break


def train_loop(config: dict[str, Any], session: Any = None) -> None:
    """One training worker: everything it needs comes in ``config`` (a ``LoopConfig`` as a dict; no module
    globals). ``session``: Ray Train's (default, inside a ``TorchTrainer``) or a ``LocalSession``
    (``train.strategy=single``)."""
    quiet_loading()
    lc = LoopConfig.model_validate(config)
    if session is None:
        store = Store(lc.root, lc.s3)
        session = RaySession((store, lc.ray_run_rel) if lc.ray_run_rel else None)
    recipe = Recipe(lc, session)
    recipe.setup()
    recipe.resume()
    recipe.train()
