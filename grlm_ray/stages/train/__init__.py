"""Stage 4b — IIFT: fine-tune the backbone on the SFT mixture with Ray Train (DDP or DeepSpeed ZeRO).

Contract: sft/{sft, terms} -> train/model (a consolidated HF model folder + tokenizer + grlm_model.json),
train/base (the initial backbone), train/tokens.parquet (packed or bucketed rows), train/deepspeed.json,
train/ray/... (Ray Train checkpoints: every rank's shard, local or S3).

The driver builds the backbone (a pretrained HF folder, or a from-scratch Qwen3-architecture model with
a tokenizer pruned to the corpus), tokenizes, then starts a ``TorchTrainer`` whose workers get everything
through ``train_loop_config``. Each checkpoint holds model, optimizer, scheduler, RNG and the step (the
data position follows from it: batches are a seeded permutation per epoch). A killed worker restarts
the group from the last checkpoint (``FailureConfig``); running the stage again with the same config
resumes the same Ray Train run. At the end the latest checkpoint is consolidated (``zero_to_fp32`` for
ZeRO) into the exported model.

The worker is a recipe (``recipe.py``: ``LoopConfig`` -> ``Recipe``), built of parts tested one by one:
``backbone.py`` (the model to fine-tune), ``schedule.py`` (steps, learning rate, DeepSpeed config),
``modules.py`` (dropout hooks, label-positions loss, weight average), ``sessions.py`` (Ray Train's or a local
session, sealed checkpoints), ``export.py`` (the consolidated model).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import pyarrow as pa

from grlm_ray.core import faults, runtime
from grlm_ray.core.config import GrlmConfig, TrainConfig
from grlm_ray.core.errors import ConfigError
from grlm_ray.core.runtime import init_ray
from grlm_ray.core.schemas import ITEMS, SEQUENCES, SFT, TARGETS, TERMS
from grlm_ray.core.run import Run
from grlm_ray.core.storage import StageContext, read_manifest
from grlm_ray.core.tracking import log_artifact, model_label, start_stage_run, tracking_uri
from grlm_ray.lib.models import load_tokenizer, quiet_loading
from grlm_ray.lib.protocol import item_lines
from grlm_ray.lib.textformat import PROMPTS, unlabeled_spans
from grlm_ray.lib.tokens import Batches, bucket, bucket_arrow, encode_all, encode_arrow, pack, render_prompt
from grlm_ray.lib.validation import build_validation_set, plot_curve, popularity_metrics
# the parts, importable from the stage as before
from grlm_ray.stages.train.backbone import build_backbone, embedder_init, tokenizer_source  # noqa: F401
from grlm_ray.stages.train.export import consolidated_state_dict, export_model  # noqa: F401
from grlm_ray.stages.train.modules import (WeightEMA, add_residual_dropout, label_positions_lm,  # noqa: F401
                                           optimizer_digest)
from grlm_ray.stages.train.recipe import LoopConfig, ValidationSpec, train_loop
from grlm_ray.stages.train.schedule import deepspeed_config, lr_factor, plan_steps, resolve_precision, resolved  # noqa: F401
from grlm_ray.stages.train.sessions import (CKPT_TAG, EMA_FILE, LocalSession, RaySession,  # noqa: F401
                                            seal_checkpoint, stored_checkpoints)

log = logging.getLogger(__name__)
STAGE = "train"


def term_vocabulary(terms: pa.Table) -> list[str]:
    """Every distinct term of a TERMS table, sorted (on Arrow: no Python list of every item's terms)."""
    import pyarrow.compute as pc

    return sorted(pc.unique(pc.list_flatten(terms.column("terms"))).to_pylist())


SampleSource = Union[pa.Table, Callable[[Optional[list[str]]], Iterable[pa.Table]]]


def sample_tables(sft: SampleSource, columns: list[str] | None, batch: int = 8192) -> Iterable[Any]:
    """The SFT samples (``columns`` of them) a batch at a time: from a table, or from a source that reads them
    one table after another (``Store.read_batches``: the whole table is never in memory)."""
    if isinstance(sft, pa.Table):
        return (sft if columns is None else sft.select(columns)).to_batches(max_chunksize=batch)
    return sft(columns)


def corpus_texts(cfg: GrlmConfig, sft: SampleSource, items: Any, terms: Any, batch: int = 8192) -> Iterator[str]:
    """Every text the model will see, streamed: rendered SFT samples plus every catalog line (so each TID,
    even one outside the training mixture, encodes with kept tokens). Python strings exist for one Arrow
    batch at a time (the whole corpus as a list took ~1.5 GB of the tokenization's 4 GB at 300k items)."""
    import pyarrow.compute as pc

    # the chat template's own text around a turn (rendered by the tokenizer's template, nothing hard-coded)
    yield render_prompt(_template_tokenizer(cfg), [{"role": "system", "content": PROMPTS[cfg.sft.prompt]["system"]},
                                                    {"role": "user", "content": "x"}])
    yield "\n"
    for b in sample_tables(sft, ["prompt", "completion"], batch):
        yield from pc.struct_field(pc.list_flatten(b.column("prompt")), "content").to_pylist()
        yield from b.column("completion").to_pylist()
    _, lines = item_lines(cfg, items, terms)  # every catalog line, as the evaluation's histories show them
    for s in range(0, len(lines), batch):
        yield from lines.slice(s, batch).to_pylist()


def _template_tokenizer(cfg: GrlmConfig) -> Any:
    quiet_loading()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_source(cfg.model))


def tokenize_sft(tokenizer: Any, sft: SampleSource, cfg: GrlmConfig,
                 write: Callable[[Iterator[pa.Table]], Any] | None = None) -> Batches:
    """The SFT samples as training rows: length-bucketed (Arrow end to end; with ``write`` the sorted rows
    go to it a slice at a time and are not kept, ``bucket_arrow``) or packed (``train.packing``)."""
    t = cfg.train
    unlabeled = unlabeled_spans(cfg.sft)
    cols = ["prompt", "completion"] + (["task"] if unlabeled else [])
    if not t.packing:  # Arrow columns end to end
        # no names kept for the encoded columns: bucketing frees them once it has its contiguous copy
        return bucket_arrow(*encode_arrow(tokenizer, sample_tables(sft, cols), cfg.model.enable_thinking,
                                          unlabeled=unlabeled),
                            t.max_length, t.micro_batch, write)
    whole = sft.select(cols) if isinstance(sft, pa.Table) else pa.concat_tables(list(sft(cols)))
    ids, labels = encode_all(tokenizer, whole.column("prompt").to_pylist(),
                             whole.column("completion").to_pylist(), cfg.model.enable_thinking,
                             unlabeled=unlabeled, tasks=whole.column("task").to_pylist() if unlabeled else None)
    ids = [x[: t.max_length] for x in ids]
    labels = [x[: t.max_length] for x in labels]
    if t.packing:
        return pack(ids, labels, t.block_size, tokenizer.pad_token_id)
    return bucket(ids, labels, t.max_length, t.micro_batch)


def _refuse(t: TrainConfig) -> None:
    """Settings that cannot train, refused before any work."""
    if t.strategy == "deepspeed" and t.deepspeed.zero_stage == 0:
        raise ConfigError("train.deepspeed.zero_stage=0: use train.strategy=ddp instead")
    if t.ema_decay and t.strategy == "deepspeed" and t.deepspeed.zero_stage == 3:
        raise ConfigError("train.ema_decay with ZeRO-3 is not supported (each rank holds a shard of the weights); "
                          "use ZeRO-2 or DDP")
    if t.validation.enabled and t.strategy == "deepspeed" and t.deepspeed.zero_stage == 3:
        raise ConfigError("train.validation with ZeRO-3 is not supported (each rank holds a shard of the weights); "
                          "use ZeRO-2 or DDP, or score checkpoints with grlm eval")


def _backbone(ctx: StageContext, cfg: GrlmConfig, sft: SampleSource, items: pa.Table,
              terms: pa.Table) -> tuple[dict[str, Any], str]:
    """The initial backbone in the run (built once: ``train/base``): its description and a local folder."""
    with tempfile.TemporaryDirectory(prefix="grlm-base-") as tmp:
        if not ctx.store.exists(ctx.rel("base/config.json")):
            backbone = build_backbone(cfg.model, corpus_texts(cfg, sft, items, terms), tmp, term_vocabulary(terms),
                                      embedder=cfg.embed.model)
            ctx.store.write_json(ctx.rel("base_info.json"), backbone)
            ctx.store.upload_dir(tmp, ctx.rel("base"))
    return (ctx.store.read_json(ctx.rel("base_info.json")),
            ctx.store.local_dir(ctx.rel("base"), tempfile.mkdtemp(prefix="grlm-train-driver-")))


def _validation(ctx: StageContext, cfg: GrlmConfig, items: pa.Table, terms: pa.Table,
                tokenizer: Any) -> ValidationSpec | None:
    """The validation users and catalog written for the workers (``train.validation.enabled``)."""
    if not cfg.train.validation.enabled:
        return None
    queries, catalog = build_validation_set(
        cfg, items, ctx.read("sequences.parquet", SEQUENCES, stage="prepare"),
        ctx.read("targets.parquet", TARGETS, stage="prepare"), terms, tokenizer)
    ctx.write("validation.parquet", queries)
    ctx.write("catalog.parquet", catalog)
    return ValidationSpec(
        queries_rel=ctx.rel("validation.parquet"), catalog_rel=ctx.rel("catalog.parquet"),
        curve_rel=ctx.rel("validation_curve.json"), best_rel=ctx.rel("best"),
        max_new_tokens=cfg.eval.max_new_tokens, decay=cfg.eval.decay, match=cfg.eval.match,
        # scored as the evaluation scores (transformers backend: unless eval.renormalize)
        renormalize=bool(cfg.eval.renormalize), popularity=popularity_metrics(queries, catalog))


def _plan(ctx: StageContext, cfg: GrlmConfig, stats: dict[str, Any]) -> tuple[dict[str, int], dict[str, Any] | None]:
    """Steps and micro batches for the workers (Ray's CPUs checked first), and the DeepSpeed config."""
    t = cfg.train
    world = 1 if t.strategy == "single" else t.num_workers
    if t.strategy != "single":
        ray = init_ray(cfg.ray)
        cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        if not t.use_gpu and t.num_workers * t.cpus_per_worker > cpus:
            raise ConfigError(f"train.num_workers={t.num_workers} x cpus_per_worker={t.cpus_per_worker} > {cpus} "
                              "CPUs in the Ray cluster")
    plan = plan_steps(t, stats["rows"], stats["samples"], world)
    ds_cfg = deepspeed_config(t, plan["accum"], t.num_workers) if t.strategy == "deepspeed" else None
    if ds_cfg:
        ctx.store.write_json(ctx.rel("deepspeed.json"), ds_cfg)
    return plan, ds_cfg


def _export(ctx: StageContext, cfg: GrlmConfig, result: Any, base_local: str, manifest: dict[str, Any],
            validation: ValidationSpec | None) -> dict[str, Any]:
    """The exported model (``train/model``): the validation-best weights (``train.validation.export=best``)
    or the last checkpoint's; the learning curve and its best point."""
    t = cfg.train
    curve = best = None
    if validation is not None:
        curve = ctx.store.read_json(ctx.rel("validation_curve.json")) if ctx.store.exists(
            ctx.rel("validation_curve.json")) else []
        best = max(curve, key=lambda p: p[t.validation.metric]) if curve else None
    exported = "last"
    with tempfile.TemporaryDirectory(prefix="grlm-export-") as out, contextlib.ExitStack() as stack:
        if best is not None and t.validation.export == "best" and ctx.store.exists(ctx.rel("best/model.pt")):
            cd = ctx.store.local_dir(ctx.rel("best"), tempfile.mkdtemp(prefix="grlm-best-"))
            exported = f"best (step {best['step']})"
            manifest.update({"step": best["step"], "validation": best})
        else:
            cd = stack.enter_context(result.checkpoint.as_directory())
        manifest["exported"] = exported
        export = export_model(cd, base_local, out, manifest)
        ctx.store.upload_dir(out, ctx.rel("model"))
    return {"export": export, "exported": exported, "curve": curve, "best": best}


def _throughput(result: Any) -> dict[str, float | None]:
    """Mean tokens / samples per second over the log windows (the first, with warm-up, left out)."""
    history = result.metrics_dataframe
    tps = history["tokens_per_s"].dropna().tolist() if history is not None and "tokens_per_s" in history else []
    sps = history["samples_per_s"].dropna().tolist() if history is not None and "samples_per_s" in history else []
    tps, sps = (tps[1:], sps[1:]) if len(tps) > 2 else (tps, sps)  # the first window includes warm-up
    return {"tokens_per_s": round(sum(tps) / len(tps), 1) if tps else None,
            "samples_per_s": round(sum(sps) / len(sps), 2) if sps else None}


def train(cfg: GrlmConfig) -> dict[str, Any]:
    _refuse(cfg.train)
    # train.precision=auto resolved here, once: the workers and the DeepSpeed config get fp32 or bf16 (the
    # stage's key hashes the same resolved config: registry.stage_key)
    cfg = resolved(cfg, warn=True)
    t, m = cfg.train, cfg.model
    if not t.use_gpu:  # DeepSpeed's accelerator probe warns on every CPU import; say CPU up front
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    def body(ctx: StageContext) -> None:
        quiet_loading()
        sft_rel = ctx.stage_rel("sft", "sft.parquet")

        def sft(columns: list[str] | None) -> Iterator[pa.Table]:  # read a batch at a time, never whole
            return ctx.store.read_batches(sft_rel, SFT, columns, batch_rows=8192)

        terms = ctx.read("terms.parquet", TERMS, stage="sft")
        items = ctx.read("items.parquet", ITEMS, stage="prepare", columns=["item_id", "title"])  # titles only
        t0 = time.time()
        backbone, base_local = _backbone(ctx, cfg, sft, items, terms)
        tokenizer = load_tokenizer(base_local)
        batches = tokenize_sft(tokenizer, sft, cfg, write=lambda rows: ctx.write_batches("tokens.parquet", rows))
        if batches.table is not None:  # packed rows: built whole
            ctx.write("tokens.parquet", batches.table)
        tok_seconds = time.time() - t0
        validation = _validation(ctx, cfg, items, terms, tokenizer)
        plan, ds_cfg = _plan(ctx, cfg, batches.stats)
        run_id = start_stage_run(cfg, STAGE, model_label(cfg)) if cfg.tracking.enabled else None
        train_name = f"{cfg.run.name}-train-{cfg.section_hash('model', 'train')[:8]}"
        loop_config = LoopConfig(
            train=t, root=ctx.store.uri(""), s3=cfg.run.s3, base_rel=ctx.rel("base"), tokens_rel=ctx.rel("tokens.parquet"),
            packed=batches.packed, pad_id=int(tokenizer.pad_token_id), plan=plan, deepspeed=ds_cfg,
            mlflow={"uri": tracking_uri(cfg), "run_id": run_id} if run_id else None,
            threads=max(1, int(t.cpus_per_worker)), validation=validation,
            dropout=m.dropout if m.init == "scratch" else 0.0,
            ray_run_rel=f"{ctx.rel('ray')}/{train_name}",  # where a stopped job's checkpoints are found
            faults=faults.spec(),  # tests only (GRLM_FAULTS), read here in the driver
            verbose=runtime.console_verbose(),
        ).model_dump(mode="json")  # a plain dict on the wire; each worker validates it again
        t1 = time.time()
        result = _fit_single(ctx, t, loop_config) if t.strategy == "single" else _fit_ray(ctx, t, loop_config, train_name)
        attempt_seconds = time.time() - t1
        if result.checkpoint is None:
            raise ConfigError("training finished without a checkpoint")
        final = dict(result.metrics or {})
        # training time: the loop's clock (steps only, validation excluded), carried across the attempts of a run
        # that was stopped and resumed; this attempt's wall time (start-up and validation included) beside it
        train_seconds = float(final.get("train_seconds") or attempt_seconds)
        manifest = {
            "base_model": m.path, "init": m.init, "backbone": backbone, "chat_template": tokenizer.chat_template,
            "enable_thinking": m.enable_thinking, "prompt_version": _sft_prompt_version(ctx),
            "tid_source": _sft_terms_source(ctx), "num_terms": cfg.ctg.num_terms,
            "mlflow_run_id": run_id, "ray_train_run": train_name if t.strategy != "single" else None,
            "checkpoint": result.checkpoint.path, "step": final.get("step"),
        }
        ex = _export(ctx, cfg, result, base_local, manifest, validation)
        if ex["curve"]:
            _record_curve(ctx, cfg, ex["curve"], validation.popularity, run_id)
        ctx.info.update({
            "mlflow_run_id": run_id, "run_name": model_label(cfg), "backbone": backbone, "plan": plan,
            "tokens": batches.stats, "tokenize_seconds": round(tok_seconds, 2), "train_seconds": round(train_seconds, 2),
            "attempt_seconds": round(attempt_seconds, 2),
            "first_loss": final.get("first_loss"), "final_loss": final.get("loss"), **_throughput(result),
            "first_grad_norm": final.get("first_grad_norm"), "final_grad_norm": final.get("grad_norm"),
            "steps": final.get("step"), "resumed_from_step": final.get("resumed_from_step"),
            "optimizer_digest_saved": final.get("digest_saved"), "optimizer_digest_loaded": final.get("digest_loaded"),
            "export": ex["export"], "exported": ex["exported"], "strategy": t.strategy, "precision": t.precision,
            "validation": {"points": ex["curve"], "best": ex["best"], "popularity": validation.popularity}
            if ex["curve"] else None,
            "zero_stage": t.deepspeed.zero_stage if t.strategy == "deepspeed" else None,
            "model_dir": ctx.store.uri(ctx.rel("model")), "checkpoint": result.checkpoint.path,
        })

    return Run.of(cfg).run_stage(STAGE, body, inputs={"sft": ("sft", "sft.parquet")})


def _fit_ray(ctx: StageContext, t: TrainConfig, loop_config: dict[str, Any], train_name: str) -> Any:
    """``train_loop`` on ``t.num_workers`` Ray Train workers (DDP or DeepSpeed); Ray Train's Result."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = ctx.store.uri(ctx.rel("ray"))
    env = {"DS_ACCELERATOR": "cpu"} if not t.use_gpu else {}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(
            name=train_name, storage_path=storage if not ctx.store.is_s3 else ctx.store.path(ctx.rel("ray")),
            storage_filesystem=ctx.store.fs if ctx.store.is_s3 else None,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=t.max_failures),
            worker_runtime_env={"env_vars": env} if env else None,
            logging_config=LoggingConfig(log_level="WARNING"),  # not one line per reported step
        ),
    )
    return trainer.fit()


class SingleResult:
    """What the driver reads of a finished run, as Ray Train's Result has it."""

    def __init__(self, session: LocalSession) -> None:
        import pandas as pd

        self.checkpoint = session.latest
        self.metrics = session.history[-1] if session.history else {}
        self.metrics_dataframe = pd.DataFrame(session.history) if session.history else None


def _fit_single(ctx: StageContext, t: TrainConfig, loop_config: dict[str, Any]) -> SingleResult:
    """``train.strategy=single``: the same loop in this process (one CPU or one GPU, no Ray needed)."""
    session = LocalSession(ctx.store, ctx.rel("single"), t.keep_checkpoints)
    loop_config = {**loop_config, "threads": max(1, int(t.cpus_per_worker))}
    train_loop(loop_config, session)
    return SingleResult(session)


def _record_curve(ctx: StageContext, cfg: GrlmConfig, curve: list[dict[str, Any]], popularity: dict[str, float],
                  run_id: str | None) -> None:
    """The learning curve as a plot next to the model (and in MLflow)."""

    with tempfile.TemporaryDirectory(prefix="grlm-curve-") as d:
        png = os.path.join(d, "learning_curve.png")
        plot_curve(curve, png, popularity)
        with open(png, "rb") as f:
            ctx.store.write_bytes(ctx.rel("learning_curve.png"), f.read())
        if run_id:
            log_artifact(cfg, run_id, png)


def _sft_prompt_version(ctx: StageContext) -> str:
    return ((read_manifest(ctx.store, ctx.run, "sft") or {}).get("info") or {}).get("prompt_version", "")


def _sft_terms_source(ctx: StageContext) -> str:
    return ((read_manifest(ctx.store, ctx.run, "sft") or {}).get("info") or {}).get("terms_source", "")
