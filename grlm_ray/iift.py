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
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from typing import Any

from grlm_ray.config import GrlmConfig, ModelConfig, TrainConfig
from grlm_ray.errors import ConfigError
from grlm_ray.schemas import ITEMS, SFT, TERMS
from grlm_ray.storage import StageContext, Store, run_stage

log = logging.getLogger(__name__)
STAGE = "train"
CKPT_TAG = "state"  # DeepSpeed checkpoint tag inside every Ray Train checkpoint


# --------------------------------------------------------------------------- backbone
def tokenizer_source(m: ModelConfig) -> str:
    from grlm_ray.generation import gguf_to_hf
    from grlm_ray.models import resolve_model_path

    path = resolve_model_path(m.path)
    return gguf_to_hf(path, m.cache_dir) if path.endswith(".gguf") else path


def build_backbone(m: ModelConfig, corpus: list[str], out_dir: str) -> dict[str, Any]:
    """Write the initial model + tokenizer to ``out_dir``; returns a description for the manifest."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    src = tokenizer_source(m)
    tok = AutoTokenizer.from_pretrained(src)
    info: dict[str, Any] = {"init": m.init, "source": m.path}
    if m.init == "pretrained":
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    else:
        if m.prune_vocab:
            from grlm_ray.vocab import prune_tokenizer

            tok, report = prune_tokenizer(tok, corpus)
            info["vocab_pruning"] = report
        torch.manual_seed(m.seed)
        qcfg = Qwen3Config(
            vocab_size=len(tok), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
            head_dim=m.head_dim, max_position_embeddings=m.max_position, rope_theta=m.rope_theta,
            tie_word_embeddings=m.tie_embeddings, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
        model = AutoModelForCausalLM.from_config(qcfg, dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    info.update({"parameters": n_params, "parameters_besides_embeddings": n_params - n_embed,
                 "vocab_size": len(tok), "architecture": type(model).__name__})
    return info


# --------------------------------------------------------------------------- schedule / batching
def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to ``min_ratio`` of the peak."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def plan_steps(t: TrainConfig, rows: int, samples: int, world: int) -> dict[str, int]:
    """Rows per optimizer step (a multiple of world * micro_batch) and the step counts."""
    per_row = max(1.0, samples / max(1, rows))
    want_rows = max(1, round(t.global_batch / per_row))
    unit = world * t.micro_batch
    accum = max(1, round(want_rows / unit))
    rows_per_step = unit * accum
    if rows < rows_per_step:
        accum = max(1, rows // unit)
        rows_per_step = unit * accum
    if rows < rows_per_step:
        raise ConfigError(f"only {rows} training rows for {world} workers x micro_batch {t.micro_batch}: "
                          "lower train.micro_batch or train.num_workers")
    steps_per_epoch = rows // rows_per_step
    total = max(1, math.ceil(t.epochs * steps_per_epoch))
    if t.max_steps:
        total = min(total, t.max_steps)
    return {"rows_per_step": rows_per_step, "accum": accum, "steps_per_epoch": steps_per_epoch, "total_steps": total}


def deepspeed_config(t: TrainConfig, accum: int, world: int) -> dict[str, Any]:
    """The DeepSpeed JSON, generated from a few typed knobs (saved with the run)."""
    d = t.deepspeed
    zero: dict[str, Any] = {"stage": d.zero_stage, "overlap_comm": d.overlap_comm, "contiguous_gradients": True,
                            "reduce_bucket_size": d.reduce_bucket_size}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if d.offload_params and d.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    if d.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch * accum * world,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # our torch AdamW (FusedAdam needs CUDA)
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# --------------------------------------------------------------------------- worker
def optimizer_digest(optimizer: Any, partitioned: bool) -> float:
    """Sum of |exp_avg| + |exp_avg_sq| over the whole optimizer (summed over ranks when ZeRO partitions it)."""
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)
    total = torch.zeros((), dtype=torch.float64)
    for state in inner.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                total += state[key].detach().double().abs().sum()
    if partitioned and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return float(total)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: everything it needs comes in ``config`` (no module globals)."""
    import numpy as np
    import pyarrow.parquet as pq
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM

    from grlm_ray.config import S3Config, TrainConfig
    from grlm_ray.tokens import collate

    t = TrainConfig.model_validate(config["train"])
    # Ray Train logs every report at INFO; our own progress line (below) is enough
    for name in ("ray.train", "ray.train.v2._internal.execution.context"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    torch.manual_seed(t.seed + rank)
    store = Store(config["root"], S3Config.model_validate(config["s3"]))
    cache = tempfile.mkdtemp(prefix="grlm-train-")
    base_dir = store.local_dir(config["base_rel"], cache)
    table = pq.read_table(store.path(config["tokens_rel"]), filesystem=store.fs)
    data = table.to_pylist()
    packed, pad_id = bool(config["packed"]), int(config["pad_id"])
    plan = config["plan"]
    rows_per_step, accum, spe, total = plan["rows_per_step"], plan["accum"], plan["steps_per_epoch"], plan["total_steps"]
    use_ds = t.strategy == "deepspeed"
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.config.use_cache = False
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.learning_rate)
    warmup = int(t.warmup_ratio * total)

    def sched_fn(opt: Any) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, t.min_lr_ratio))

    if use_ds:
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=sched_fn, config=config["deepspeed"],
            dist_init_required=False)
        module = engine
    else:
        model.to(device)
        scheduler = sched_fn(optimizer)
        module = ray.train.torch.prepare_model(model) if world > 1 else model
        engine = None
    partitioned = use_ds and t.deepspeed.zero_stage >= 1

    start, resumed, first_loss = 0, None, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            meta = json.load(open(os.path.join(d, "meta.json")))
            if use_ds:
                engine.load_checkpoint(d, tag=CKPT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
            else:
                target = module.module if hasattr(module, "module") else module
                target.load_state_dict(torch.load(os.path.join(d, "model.pt"), map_location=device))
                optimizer.load_state_dict(torch.load(os.path.join(d, "optimizer.pt"), map_location=device))
                scheduler.load_state_dict(torch.load(os.path.join(d, "scheduler.pt")))
            rng_file = os.path.join(d, f"rng_rank{rank}.pt")
            if os.path.exists(rng_file):
                torch.set_rng_state(torch.load(rng_file))
        start = int(meta["step"])
        first_loss = meta.get("first_loss")
        resumed = {"from_step": start, "digest_saved": meta["optimizer_digest"],
                   "digest_loaded": optimizer_digest(optimizer, partitioned)}

    mlflow_client = None
    if rank == 0 and config.get("mlflow"):
        from mlflow.tracking import MlflowClient

        mlflow_client = MlflowClient(config["mlflow"]["uri"])
        run_id = config["mlflow"]["run_id"]
        if resumed:
            mlflow_client.log_metric(run_id, "train/resumed_from_step", resumed["from_step"], step=start)

    def save(step: int, metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="grlm-ckpt-") as d:
            if use_ds:
                engine.save_checkpoint(d, tag=CKPT_TAG, client_state={"step": step})
            elif rank == 0:
                target = module.module if hasattr(module, "module") else module
                torch.save(target.state_dict(), os.path.join(d, "model.pt"))
                torch.save(optimizer.state_dict(), os.path.join(d, "optimizer.pt"))
                torch.save(scheduler.state_dict(), os.path.join(d, "scheduler.pt"))
            torch.save(torch.get_rng_state(), os.path.join(d, f"rng_rank{rank}.pt"))
            digest = optimizer_digest(optimizer, partitioned)
            if rank == 0:
                with open(os.path.join(d, "meta.json"), "w") as f:
                    json.dump({"step": step, "optimizer_digest": digest, "strategy": t.strategy, "first_loss": first_loss,
                               "zero_stage": t.deepspeed.zero_stage if use_ds else None}, f)
            # every rank reports its own folder: Ray Train merges them into one checkpoint
            ray.train.report({**metrics, "optimizer_digest": digest},
                             checkpoint=ray.train.Checkpoint.from_directory(d))

    def order(epoch: int) -> Any:
        """The epoch's row order, seeded. Packed rows are shuffled one by one; padded rows (sorted by
        length) are shuffled in whole micro batches, so each micro batch keeps similar lengths."""
        rng = np.random.default_rng(t.seed + epoch)
        if packed:
            return rng.permutation(len(data))
        chunks = [np.arange(s, min(s + t.micro_batch, len(data))) for s in range(0, len(data), t.micro_batch)]
        return np.concatenate([chunks[j] for j in rng.permutation(len(chunks))])

    fail_rank = min(1, world - 1)
    window_tokens, window_samples, window_t0 = 0, 0, time.time()
    module.train()
    for step in range(start, total):
        if t.fail_at_step is not None and step == t.fail_at_step and rank == fail_rank and ckpt is None:
            log.warning("fault injection: rank %d exits at step %d", rank, step)
            # Ray Train's controller registers reported checkpoints asynchronously: let it take the last one
            # first, so "resume from the last checkpoint before the failure" is what the test observes
            time.sleep(5)
            os._exit(1)
        epoch, pos = divmod(step, spe)
        step_rows = order(epoch)[pos * rows_per_step:(pos + 1) * rows_per_step]
        per_rank = rows_per_step // world  # a multiple of micro_batch: micro batches stay whole
        mine = step_rows[rank * per_rank:(rank + 1) * per_rank]
        loss_sum = 0.0
        for a in range(accum):
            batch = collate([data[i] for i in mine[a * t.micro_batch:(a + 1) * t.micro_batch]], packed, pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            if use_ds:
                out = engine(**batch)
                engine.backward(out.loss)
                engine.step()
            else:
                sync = a == accum - 1 or world == 1
                ctx_mgr = module.no_sync() if (not sync and hasattr(module, "no_sync")) else contextlib.nullcontext()
                with ctx_mgr:
                    out = module(**batch)
                    (out.loss / accum).backward()
            loss_sum += float(out.loss.detach())
        if not use_ds:
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(module.parameters(), t.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        window_tokens += sum(int(data[i]["length"]) for i in mine)  # real (non-padding) tokens
        window_samples += sum(int(data[i]["samples"]) for i in mine)
        done = step + 1
        if first_loss is None:
            first_loss = loss_sum / accum
        metrics = {"step": done, "epoch": epoch, "loss": loss_sum / accum, "first_loss": first_loss,
                   "lr": float(scheduler.get_last_lr()[0]) if hasattr(scheduler, "get_last_lr") else t.learning_rate}
        if resumed:
            metrics.update({"resumed_from_step": resumed["from_step"], "digest_saved": resumed["digest_saved"],
                            "digest_loaded": resumed["digest_loaded"]})
        if done % t.log_every == 0 or done == total:
            elapsed = max(1e-9, time.time() - window_t0)
            # every rank processes the same number of rows per step: scale this rank's count by world
            metrics["tokens_per_s"] = window_tokens * world / elapsed
            metrics["samples_per_s"] = window_samples * world / elapsed
            window_tokens, window_samples, window_t0 = 0, 0, time.time()
            if rank == 0:  # progress, one line per log window (forwarded to the driver by Ray)
                sys.stdout.write(f"[iift] step {done}/{total} epoch {epoch} loss {metrics['loss']:.4f} "
                                 f"lr {metrics['lr']:.2e} tokens/s {metrics['tokens_per_s']:.0f}\n")
                sys.stdout.flush()
            if mlflow_client is not None:
                for k in ("loss", "lr", "tokens_per_s", "samples_per_s"):
                    mlflow_client.log_metric(run_id, f"train/{k}", float(metrics[k]), step=done)
        if done % t.checkpoint_every == 0 or done == total:
            save(done, metrics)
        else:
            ray.train.report(metrics)


# --------------------------------------------------------------------------- export
def consolidated_state_dict(ckpt_dir: str) -> dict[str, Any]:
    """The full fp32 model weights of a checkpoint folder (ZeRO shards gathered, or the DDP file)."""
    import torch

    meta = json.load(open(os.path.join(ckpt_dir, "meta.json")))
    if meta["strategy"] == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=CKPT_TAG))
    return torch.load(os.path.join(ckpt_dir, "model.pt"), map_location="cpu")


def export_model(ckpt_dir: str, base_dir: str, out_dir: str, manifest: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state = consolidated_state_dict(ckpt_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ConfigError(f"checkpoint does not match the backbone: missing {missing}, unexpected {unexpected}")
    model.config.use_cache = True
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    with open(os.path.join(out_dir, "grlm_model.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    return {"tensors": len(state)}


# --------------------------------------------------------------------------- driver
def corpus_texts(cfg: GrlmConfig, sft_table: Any, items: Any, terms: Any) -> list[str]:
    """Every text the model will see: rendered SFT samples plus every catalog line (so each TID, even
    one outside the training mixture, encodes with kept tokens)."""
    from grlm_ray.sft import item_line, SYSTEM

    titles = dict(zip(items.column("item_id").to_pylist(), items.column("title").to_pylist()))
    texts = [m["content"] for msgs in sft_table.column("prompt").to_pylist() for m in msgs]
    texts += sft_table.column("completion").to_pylist()
    texts += [item_line(tids, titles.get(i, ""), cfg.sft.max_title_chars)
              for i, tids in zip(terms.column("item_id").to_pylist(), terms.column("terms").to_pylist())]
    texts += ["<|im_start|>system\n" + SYSTEM + "<|im_end|>\n<|im_start|>user\n", "<|im_start|>assistant\n", "\n"]
    return texts


def tokenize_sft(tokenizer: Any, sft_table: Any, cfg: GrlmConfig):
    from grlm_ray.tokens import bucket, encode_all, pack

    t = cfg.train
    ids, labels = encode_all(tokenizer, sft_table.column("prompt").to_pylist(),
                             sft_table.column("completion").to_pylist(), cfg.model.enable_thinking)
    ids = [x[: t.max_length] for x in ids]
    labels = [x[: t.max_length] for x in labels]
    if t.packing:
        return pack(ids, labels, t.block_size, tokenizer.pad_token_id)
    return bucket(ids, labels, t.max_length, t.micro_batch)


def run_name(cfg: GrlmConfig) -> str:
    m, t = cfg.model, cfg.train
    backbone = os.path.basename(m.path.rstrip("/")).split(".")[0] if m.init == "pretrained" else \
        f"scratch{m.num_layers}x{m.hidden_size}"
    strat = f"zero{t.deepspeed.zero_stage}" if t.strategy == "deepspeed" else "ddp"
    return f"{backbone}-tid{cfg.ctg.num_terms}-{cfg.sft.terms}-{strat}"


def train(cfg: GrlmConfig) -> dict[str, Any]:
    store = Store(cfg.run.root, cfg.run.s3)
    t, m = cfg.train, cfg.model
    if t.strategy == "deepspeed" and t.deepspeed.zero_stage == 0:
        raise ConfigError("train.deepspeed.zero_stage=0: use train.strategy=ddp instead")

    def body(ctx: StageContext) -> None:
        import pyarrow.parquet as pq  # noqa: F401
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from transformers import AutoTokenizer

        from grlm_ray.runtime import init_ray
        from grlm_ray.tracking import start_stage_run

        sft_table = ctx.read("sft.parquet", SFT, stage="sft")
        terms = ctx.read("terms.parquet", TERMS, stage="sft")
        items = ctx.read("items.parquet", ITEMS, stage="prepare")
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="grlm-base-") as tmp:
            if not ctx.store.exists(ctx.rel("base/config.json")):
                backbone = build_backbone(m, corpus_texts(cfg, sft_table, items, terms), tmp)
                ctx.store.write_json(ctx.rel("base_info.json"), backbone)
                ctx.store.upload_dir(tmp, ctx.rel("base"))
            backbone = ctx.store.read_json(ctx.rel("base_info.json"))
        cache = tempfile.mkdtemp(prefix="grlm-train-driver-")
        base_local = ctx.store.local_dir(ctx.rel("base"), cache)
        tokenizer = AutoTokenizer.from_pretrained(base_local)
        batches = tokenize_sft(tokenizer, sft_table, cfg)
        ctx.write("tokens.parquet", batches.table)
        tok_seconds = time.time() - t0

        ray = init_ray(cfg.ray)
        cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        if not t.use_gpu and t.num_workers * t.cpus_per_worker > cpus:
            raise ConfigError(f"train.num_workers={t.num_workers} x cpus_per_worker={t.cpus_per_worker} > {cpus} CPUs "
                              "in the Ray cluster")
        plan = plan_steps(t, batches.table.num_rows, batches.stats["samples"], t.num_workers)
        ds_cfg = deepspeed_config(t, plan["accum"], t.num_workers) if t.strategy == "deepspeed" else None
        if ds_cfg:
            ctx.store.write_json(ctx.rel("deepspeed.json"), ds_cfg)
        mlflow_info = None
        run_id = start_stage_run(cfg, STAGE, run_name(cfg)) if cfg.tracking.enabled else None
        if run_id:
            from grlm_ray.tracking import tracking_uri

            mlflow_info = {"uri": tracking_uri(cfg), "run_id": run_id}
        train_name = f"{cfg.run.name}-train-{cfg.section_hash('model', 'train')[:8]}"
        storage = ctx.store.uri(ctx.rel("ray"))
        env = {"DS_ACCELERATOR": "cpu"} if not t.use_gpu else {}
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "train": t.model_dump(mode="json"), "root": ctx.store.uri(""), "s3": cfg.run.s3.model_dump(mode="json"),
                "base_rel": ctx.rel("base"), "tokens_rel": ctx.rel("tokens.parquet"), "packed": batches.packed,
                "pad_id": int(tokenizer.pad_token_id), "plan": plan, "deepspeed": ds_cfg, "mlflow": mlflow_info,
                "threads": max(1, int(t.cpus_per_worker)),
            },
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
        t1 = time.time()
        result = trainer.fit()
        train_seconds = time.time() - t1
        if result.checkpoint is None:
            raise ConfigError("training finished without a checkpoint")
        final = dict(result.metrics or {})
        manifest = {
            "base_model": m.path, "init": m.init, "backbone": backbone, "chat_template": tokenizer.chat_template,
            "enable_thinking": m.enable_thinking, "prompt_version": _sft_prompt_version(ctx),
            "tid_source": _sft_terms_source(ctx), "num_terms": cfg.ctg.num_terms,
            "mlflow_run_id": run_id, "ray_train_run": train_name, "checkpoint": result.checkpoint.path,
            "step": final.get("step"),
        }
        with tempfile.TemporaryDirectory(prefix="grlm-export-") as out, result.checkpoint.as_directory() as cd:
            export = export_model(cd, base_local, out, manifest)
            ctx.store.upload_dir(out, ctx.rel("model"))
        history = result.metrics_dataframe
        tps = history["tokens_per_s"].dropna().tolist() if history is not None and "tokens_per_s" in history else []
        sps = history["samples_per_s"].dropna().tolist() if history is not None and "samples_per_s" in history else []
        tps, sps = (tps[1:], sps[1:]) if len(tps) > 2 else (tps, sps)  # the first window includes warm-up
        ctx.info.update({
            "mlflow_run_id": run_id, "run_name": run_name(cfg), "backbone": backbone, "plan": plan,
            "tokens": batches.stats, "tokenize_seconds": round(tok_seconds, 2), "train_seconds": round(train_seconds, 2),
            "first_loss": final.get("first_loss"), "final_loss": final.get("loss"),
            "tokens_per_s": round(sum(tps) / len(tps), 1) if tps else None,
            "samples_per_s": round(sum(sps) / len(sps), 2) if sps else None, "steps": final.get("step"),
            "resumed_from_step": final.get("resumed_from_step"),
            "optimizer_digest_saved": final.get("digest_saved"), "optimizer_digest_loaded": final.get("digest_loaded"),
            "export": export, "strategy": t.strategy,
            "zero_stage": t.deepspeed.zero_stage if t.strategy == "deepspeed" else None,
            "model_dir": ctx.store.uri(ctx.rel("model")), "checkpoint": result.checkpoint.path,
        })

    return run_stage(store, cfg.run.name, STAGE, cfg.section_hash("data", "sft", "model", "train") + "-" + _sft_hash(store, cfg),
                     body, resume=cfg.run.resume, inputs={"sft": store.uri(f"{cfg.run.name}/sft/sft.parquet")})


def _sft_hash(store: Store, cfg: GrlmConfig) -> str:
    from grlm_ray.storage import read_manifest

    return str((read_manifest(store, cfg.run.name, "sft") or {}).get("config_hash", "none"))[-8:]


def _sft_prompt_version(ctx: StageContext) -> str:
    from grlm_ray.storage import read_manifest

    return ((read_manifest(ctx.store, ctx.run, "sft") or {}).get("info") or {}).get("prompt_version", "")


def _sft_terms_source(ctx: StageContext) -> str:
    from grlm_ray.storage import read_manifest

    return ((read_manifest(ctx.store, ctx.run, "sft") or {}).get("info") or {}).get("terms_source", "")
