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
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import pyarrow as pa

from grlm_ray.core import faults, runtime
from grlm_ray.core.config import GrlmConfig, ModelConfig, S3Config, TrainConfig
from grlm_ray.core.errors import ConfigError
from grlm_ray.core.registry import reads, stage_key
from grlm_ray.core.runtime import init_ray
from grlm_ray.core.schemas import ITEMS, SEQUENCES, SFT, TARGETS, TERMS
from grlm_ray.core.storage import StageContext, Store, read_manifest, run_stage
from grlm_ray.core.tracking import log_artifact, model_label, start_stage_run, tracking_uri
from grlm_ray.lib.generation import gguf_to_hf
from grlm_ray.lib.models import load_tokenizer, quiet_loading, resolve_model_path
from grlm_ray.lib.protocol import item_lines
from grlm_ray.lib.textformat import PROMPTS, unlabeled_spans
from grlm_ray.lib.tokens import IGNORE, Batches, bucket, bucket_arrow, collate, encode_all, encode_arrow, pack, render_prompt
from grlm_ray.lib.validation import Validator, build_validation_set, plot_curve, popularity_metrics, reduce_metrics
from grlm_ray.lib.vocab import add_term_tokens, prune_tokenizer

log = logging.getLogger(__name__)
STAGE = "train"
CKPT_TAG = "state"  # DeepSpeed checkpoint tag inside every Ray Train checkpoint
EMA_FILE = "ema.pt"  # train.ema_decay: the weight average inside a checkpoint (rank 0)


# --------------------------------------------------------------------------- backbone
def tokenizer_source(m: ModelConfig) -> str:
    path = resolve_model_path(m.path)
    return gguf_to_hf(path, m.cache_dir) if path.endswith(".gguf") else path


def embedder_init(model: Any, tok: Any, embedder: str, threads: int = 1) -> dict[str, Any]:
    """``model.embed_init=embedder``: each token's text (``tok.decode([id])``, stripped) encoded by the sentence
    embedder, the vectors projected to the hidden size by PCA (the first components; extra dimensions, if the
    model is wider than the embedder, keep their random values) and scaled to the random init's standard
    deviation. Special and whitespace-only tokens keep their random init."""
    quiet_loading()
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    weight = model.get_input_embeddings().weight
    special = set(tok.all_special_ids)
    ids, texts = [], []
    for i in range(weight.shape[0]):
        text = tok.decode([i]).strip() if i < len(tok) and i not in special else ""
        if text:
            ids.append(i)
            texts.append(text)
    if len(ids) < 2:
        raise ConfigError("model.embed_init=embedder: the tokenizer has fewer than 2 tokens with text")
    torch.set_num_threads(max(1, threads))
    enc = SentenceTransformer(resolve_model_path(embedder), device="cpu")
    x = enc.encode(texts, batch_size=256, convert_to_numpy=True, normalize_embeddings=True,
                   show_progress_bar=False).astype(np.float64)
    x -= x.mean(axis=0)
    _, sv, vt = np.linalg.svd(x, full_matrices=False)
    k = min(weight.shape[1], vt.shape[0])
    proj = x @ vt[:k].T
    std = float(weight.detach().std())
    proj *= std / max(proj.std(), 1e-12)
    with torch.no_grad():
        weight[torch.tensor(ids), :k] = torch.tensor(proj, dtype=weight.dtype)
    explained = float((sv[:k] ** 2).sum() / (sv ** 2).sum())
    return {"embed_init": "embedder", "embedder": embedder, "embedded_tokens": len(ids),
            "components": k, "explained_variance": round(explained, 4)}


def build_backbone(m: ModelConfig, corpus: Iterable[str], out_dir: str, terms: list[str] | None = None,
                   embedder: str | None = None) -> dict[str, Any]:
    """Write the initial model + tokenizer to ``out_dir``; returns a description for the manifest.
    ``terms``: every distinct TID term (``model.vocab=terms`` makes each one token); ``embedder``: the
    sentence embedder for ``model.embed_init=embedder``."""
    quiet_loading()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    src = tokenizer_source(m)
    tok = AutoTokenizer.from_pretrained(src)
    info: dict[str, Any] = {"init": m.init, "source": m.path}
    if m.init == "pretrained":
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    else:
        if m.vocab == "terms":
            info["term_vocab"] = add_term_tokens(tok, terms or [])
        if m.prune_vocab:
            tok, report = prune_tokenizer(tok, corpus)
            info["vocab_pruning"] = report
        torch.manual_seed(m.seed)
        qcfg = Qwen3Config(
            vocab_size=len(tok), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
            head_dim=m.head_dim, max_position_embeddings=m.max_position, rope_theta=m.rope_theta,
            attention_dropout=m.dropout,
            tie_word_embeddings=m.tie_embeddings, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
        model = AutoModelForCausalLM.from_config(qcfg, dtype=torch.float32)
        if m.embed_init == "embedder":
            if not embedder:
                raise ConfigError("model.embed_init=embedder needs the sentence embedder's path (embed.model)")
            info["embedding_init"] = embedder_init(model, tok, embedder)
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
def add_residual_dropout(model: Any, p: float) -> int:
    """Dropout (training mode only) on the token embeddings and on every attention / MLP output before the
    residual add, as forward hooks: the saved model is the plain HF architecture. Returns hooks added."""
    import torch.nn.functional as F

    if p <= 0:
        return 0

    def drop(module: Any, _inputs: Any, output: Any) -> Any:
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, True),) + tuple(output[1:])
        return F.dropout(output, p, True)

    inner = model.model
    targets = [inner.embed_tokens] + [m for layer in inner.layers for m in (layer.self_attn, layer.mlp)]
    for module in targets:
        module.register_forward_hook(drop)
    return len(targets)


def label_positions_lm(lm: Any) -> Any:
    """``lm`` wrapped so the forward computes the output layer only where a label is set: the same mean
    next-token cross-entropy as ``lm(**batch).loss``, without logits for prompt and padding positions."""
    import torch
    import torch.nn.functional as F


    class LabelPositionsLM(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.lm = inner

        def forward(self, input_ids: Any, labels: Any, attention_mask: Any = None, position_ids: Any = None) -> Any:
            hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids).last_hidden_state
            target = labels[:, 1:]
            keep = target != IGNORE
            logits = self.lm.lm_head(hidden[:, :-1][keep])
            loss = F.cross_entropy(logits.float(), target[keep]) if logits.shape[0] else hidden.sum() * 0.0
            return _Output(loss)

    return LabelPositionsLM(lm)


class _Output:
    def __init__(self, loss: Any) -> None:
        self.loss = loss


class WeightEMA:
    """Exponential moving average of a model's trainable weights (``train.ema_decay``), kept in fp32 next
    to the weights. The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the
    average is not anchored to the random initialisation. ``applied`` swaps the averaged weights in (for
    validation and saving) and restores the trained ones after."""

    def __init__(self, model: Any, decay: float) -> None:
        self.decay, self.updates = float(decay), 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def update(self, model: Any) -> None:
        import torch

        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self.shadow:
                    self.shadow[n].mul_(d).add_(p.detach().float(), alpha=1.0 - d)

    @contextlib.contextmanager
    def applied(self, model: Any):
        import torch

        params = {n: p for n, p in model.named_parameters() if n in self.shadow}
        backup = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ConfigError("the checkpoint's weight average does not match the model's parameters")
        self.updates = int(state["updates"])
        for n, x in state["shadow"].items():
            self.shadow[n].copy_(x)


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


def seal_checkpoint(d: str, rank: int) -> None:
    """Write this rank's list of the files it put in checkpoint folder ``d`` (relative path -> bytes), last.
    A folder found in storage is complete when every rank's list is there and every listed file has its
    size (``stored_checkpoints``): ranks upload their folders into one, in no fixed order."""
    files = {}
    for root, _, names in os.walk(d):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), d).replace(os.sep, "/")
            if not rel.startswith("files_rank"):
                files[rel] = os.path.getsize(os.path.join(root, name))
    with open(os.path.join(d, f"files_rank{rank}.json"), "w") as f:
        json.dump(files, f)


def stored_checkpoints(store: Store, rel: str) -> list[tuple[int, str]]:
    """The complete checkpoint folders directly under ``rel`` as (step, rel of the folder), oldest first.
    Complete: ``meta.json`` names the world size, and every rank's ``seal_checkpoint`` list is there with
    each file at its size. Folders from before the seal (no ``world`` in meta) are not listed."""
    from pyarrow.fs import FileSelector, FileType

    found = []
    for info in store.fs.get_file_info(FileSelector(store.path(rel), allow_not_found=True)):
        name = os.path.basename(info.path)
        folder = f"{rel}/{name}"
        if info.type != FileType.Directory or not name.startswith("checkpoint_") or not store.exists(f"{folder}/meta.json"):
            continue
        meta = store.read_json(f"{folder}/meta.json")
        if not isinstance(meta.get("world"), int):
            continue
        complete = True
        for r in range(meta["world"]):
            if not store.exists(f"{folder}/files_rank{r}.json"):
                complete = False
                break
            for sub, size in store.read_json(f"{folder}/files_rank{r}.json").items():
                if store.fs.get_file_info(store.path(f"{folder}/{sub}")).size != size:
                    complete = False
                    break
            if not complete:
                break
        if complete:
            found.append((int(meta["step"]), folder))
    return sorted(found)


class RaySession:
    """The training loop's view of Ray Train: rank, checkpoints, reports, the DDP wrapper.

    ``checkpoints`` (a store and the Ray Train run's folder in it): a job stopped between a checkpoint's
    upload and Ray Train recording it leaves a complete folder that Ray Train's restore does not know;
    ``checkpoint()`` takes the newest complete one in storage when it is newer than Ray Train's."""

    def __init__(self, checkpoints: tuple[Store, str] | None = None) -> None:
        import ray.train

        # Ray Train logs every report at INFO ("Reporting training result ..."); our own progress line is
        # enough. That module names its logger after its file path, not its module name.
        names = ["ray.train"]
        try:
            from ray.train.v2._internal.execution import context as _ctx_module

            names.append(_ctx_module.__file__)
        except ImportError:  # another Ray Train layout: its lines stay
            pass
        for name in names:
            logging.getLogger(name).setLevel(logging.WARNING)
        self._train = ray.train
        self._stored = checkpoints
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def device(self, use_gpu: bool) -> Any:
        import torch

        return self._train.torch.get_device() if use_gpu else torch.device("cpu")

    def prepare(self, model: Any) -> Any:
        return self._train.torch.prepare_model(model) if self.world > 1 else model

    def checkpoint(self) -> Any:
        """The checkpoint to resume from (an object with ``as_directory()``), or None."""
        ckpt = self._train.get_checkpoint()
        found = stored_checkpoints(*self._stored) if self._stored else []
        if not found:
            return ckpt
        step, rel = found[-1]
        if ckpt is not None:
            with ckpt.filesystem.open_input_stream(f"{ckpt.path}/meta.json") as f:
                if int(json.loads(f.read())["step"]) >= step:
                    return ckpt
        store = self._stored[0]
        log.warning("resuming from %s (step %d): complete in storage, newer than Ray Train's record (%s)",
                    store.uri(rel), step, "none" if ckpt is None else ckpt.path)
        return LocalCheckpoint(store.uri(rel), store, rel)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        ckpt = self._train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=ckpt)


class LocalCheckpoint:
    def __init__(self, path: str, store: Store, rel: str) -> None:
        self.path, self._store, self._rel = path, store, rel

    @contextlib.contextmanager
    def as_directory(self):
        with tempfile.TemporaryDirectory(prefix="grlm-ckpt-") as d:
            yield self._store.local_dir(self._rel, d)


class LocalSession:
    """``train.strategy=single``: the same loop in this process, no Ray. Checkpoints go to
    ``<train>/single/checkpoint_<step>`` in the run's store (the newest ``keep`` are kept); a second call
    resumes from the newest complete one."""

    rank, world = 0, 1

    def __init__(self, store: Store, rel: str, keep: int) -> None:
        self.store, self.rel, self.keep = store, rel, keep
        self.history: list[dict[str, Any]] = []
        self.latest: LocalCheckpoint | None = None

    def device(self, use_gpu: bool) -> Any:
        import torch

        return torch.device("cuda" if use_gpu else "cpu")

    def prepare(self, model: Any) -> Any:
        return model

    def _steps(self) -> list[int]:
        """Steps of the complete checkpoints (those with their meta.json), oldest first."""
        from pyarrow.fs import FileSelector, FileType

        infos = self.store.fs.get_file_info(FileSelector(self.store.path(self.rel), allow_not_found=True))
        names = [os.path.basename(i.path) for i in infos if i.type == FileType.Directory]
        return sorted(int(n.split("_", 1)[1]) for n in names if n.startswith("checkpoint_")
                      and self.store.exists(f"{self.rel}/{n}/meta.json"))

    def checkpoint(self) -> LocalCheckpoint | None:
        steps = self._steps()
        if not steps:
            return None
        rel = f"{self.rel}/checkpoint_{steps[-1]:08d}"
        self.latest = LocalCheckpoint(self.store.uri(rel), self.store, rel)
        return self.latest

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self.history.append(dict(metrics))
        if checkpoint_dir:
            step = int(metrics["step"])
            rel = f"{self.rel}/checkpoint_{step:08d}"
            # meta.json last: a checkpoint folder without it is incomplete and never resumed from
            for name in sorted(os.listdir(checkpoint_dir), key=lambda n: n == "meta.json"):
                with open(os.path.join(checkpoint_dir, name), "rb") as f:
                    self.store.write_bytes(f"{rel}/{name}", f.read())
            self.latest = LocalCheckpoint(self.store.uri(rel), self.store, rel)
            for old in self._steps()[:-self.keep]:
                self.store.delete_dir(f"{self.rel}/checkpoint_{old:08d}")


def train_loop(config: dict[str, Any], session: Any = None) -> None:
    """One training worker: everything it needs comes in ``config`` (no module globals). ``session``:
    Ray Train's (default, inside a ``TorchTrainer``) or a ``LocalSession`` (``train.strategy=single``)."""
    quiet_loading()
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    t = TrainConfig.model_validate(config["train"])
    store = Store(config["root"], S3Config.model_validate(config["s3"]))
    if session is None:
        session = RaySession((store, config["ray_run_rel"]) if config.get("ray_run_rel") else None)
    rank, world = session.rank, session.world
    torch.set_num_threads(max(1, int(config["threads"])))
    torch.manual_seed(t.seed + rank)
    cache = tempfile.mkdtemp(prefix="grlm-train-")
    base_dir = store.local_dir(config["base_rel"], cache)
    table = pq.read_table(store.path(config["tokens_rel"]), filesystem=store.fs)
    data = table.to_pylist()
    packed, pad_id = bool(config["packed"]), int(config["pad_id"])
    plan = config["plan"]
    rows_per_step, accum, spe, total = plan["rows_per_step"], plan["accum"], plan["steps_per_epoch"], plan["total_steps"]
    use_ds = t.strategy == "deepspeed"
    device = session.device(t.use_gpu)

    hf_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    hf_model.config.use_cache = False
    add_residual_dropout(hf_model, float(config.get("dropout", 0.0)))
    model = label_positions_lm(hf_model) if t.selective_logits else hf_model
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
        module = session.prepare(model)
        engine = None
    partitioned = use_ds and t.deepspeed.zero_stage >= 1
    ema = WeightEMA(hf_model, t.ema_decay) if t.ema_decay else None
    averaged = ema.applied if ema is not None else (lambda m: contextlib.nullcontext(m))

    def forward_precision() -> Any:
        """bf16 autocast for ddp / single (weights, optimizer state and loss stay fp32); DeepSpeed casts itself."""
        if t.precision == "bf16" and not use_ds:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    start, resumed, first_loss = 0, None, None
    vcfg = t.validation
    val_state: dict[str, Any] = {"best": None, "best_step": None, "since_best": 0, "points": []}
    clock_offset, clock_t0, val_seconds = 0.0, time.time(), 0.0

    def train_clock() -> float:
        """Seconds spent training so far (validation excluded), across resumes."""
        return round(clock_offset + time.time() - clock_t0 - val_seconds, 2)

    ckpt = session.checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            meta = json.load(open(os.path.join(d, "meta.json")))
            if use_ds:
                engine.load_checkpoint(d, tag=CKPT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
            else:
                hf_model.load_state_dict(torch.load(os.path.join(d, "model.pt"), map_location=device))
                optimizer.load_state_dict(torch.load(os.path.join(d, "optimizer.pt"), map_location=device))
                scheduler.load_state_dict(torch.load(os.path.join(d, "scheduler.pt")))
            if ema is not None:
                if not os.path.exists(os.path.join(d, EMA_FILE)):
                    raise ConfigError(f"train.ema_decay is set but checkpoint {ckpt.path} has no {EMA_FILE}: "
                                      "it was written without a weight average; resume with the same train config")
                ema.load_state_dict(torch.load(os.path.join(d, EMA_FILE), map_location=device))
            rng_file = os.path.join(d, f"rng_rank{rank}.pt")
            if os.path.exists(rng_file):
                torch.set_rng_state(torch.load(rng_file))
        start = int(meta["step"])
        first_loss = meta.get("first_loss")
        val_state.update(meta.get("validation") or {})
        clock_offset = float(meta.get("train_seconds") or 0.0)
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
                torch.save(hf_model.state_dict(), os.path.join(d, "model.pt"))
                torch.save(optimizer.state_dict(), os.path.join(d, "optimizer.pt"))
                torch.save(scheduler.state_dict(), os.path.join(d, "scheduler.pt"))
            if ema is not None and rank == 0:
                torch.save(ema.state_dict(), os.path.join(d, EMA_FILE))
            torch.save(torch.get_rng_state(), os.path.join(d, f"rng_rank{rank}.pt"))
            digest = optimizer_digest(optimizer, partitioned)
            if rank == 0:
                with open(os.path.join(d, "meta.json"), "w") as f:
                    json.dump({"step": step, "world": world, "optimizer_digest": digest, "strategy": t.strategy,
                               "first_loss": first_loss,
                               "zero_stage": t.deepspeed.zero_stage if use_ds else None, "validation": val_state,
                               "train_seconds": train_clock()}, f)
            seal_checkpoint(d, rank)
            # every rank reports its own folder: Ray Train merges them into one checkpoint
            session.report({**metrics, "optimizer_digest": digest}, checkpoint_dir=d)

    def order(epoch: int) -> Any:
        """The epoch's row order, seeded. Packed rows are shuffled one by one; padded rows (sorted by
        length) are shuffled in whole micro batches, so each micro batch keeps similar lengths."""
        rng = np.random.default_rng(t.seed + epoch)
        if packed:
            return rng.permutation(len(data))
        chunks = [np.arange(s, min(s + t.micro_batch, len(data))) for s in range(0, len(data), t.micro_batch)]
        return np.concatenate([chunks[j] for j in rng.permutation(len(chunks))])

    validator = None
    if config.get("validation"):
        vc = config["validation"]
        validator = Validator(pq.read_table(store.path(vc["queries_rel"]), filesystem=store.fs),
                              pq.read_table(store.path(vc["catalog_rel"]), filesystem=store.fs),
                              load_tokenizer(base_dir), num_beams=vcfg.num_beams,
                              batch_size=vcfg.batch_size, max_new_tokens=vc["max_new_tokens"], decay=vc["decay"],
                              match=vc["match"], rank=rank, world=world, renormalize=bool(vc.get("renormalize")))
    every = set()
    if validator is not None:
        if vcfg.every_steps:
            every.update(range(vcfg.every_steps, total + 1, vcfg.every_steps))
        if vcfg.every_epochs:
            k = max(1, round(vcfg.every_epochs * spe))
            every.update(range(k, total + 1, k))
        every.add(total)

    def validate(done: int, metrics: dict[str, Any]) -> bool:
        """Score the validation users; returns True when training should stop (patience exhausted)."""
        nonlocal val_seconds

        t_v = time.time()
        with averaged(hf_model) as scored:
            res = reduce_metrics(validator.sums(scored), world)
        took = time.time() - t_v
        val_seconds += took
        point = {"step": done, "epoch": round(done / spe, 4), "train_minutes": round(train_clock() / 60, 3),
                 "seconds": round(took, 2), **{k: round(x, 6) if isinstance(x, float) else x for k, x in res.items()}}
        val_state["points"].append(point)
        score = res[vcfg.metric]
        if val_state["best"] is None or score > val_state["best"]:
            val_state.update(best=score, best_step=done, since_best=0)
            if rank == 0:
                with averaged(hf_model):
                    save_best(done, point)
        else:
            val_state["since_best"] += 1
        metrics.update({f"val_{k}": x for k, x in res.items() if k != "users"})
        metrics["val_best"] = val_state["best"]
        if rank == 0:
            store.write_json(config["validation"]["curve_rel"], val_state["points"])
            sys.stdout.write(f"[iift] validation step {done} epoch {point['epoch']:.2f}: R@10 {res['recall_at_10']:.4f} "
                             f"N@10 {res['ndcg_at_10']:.4f} VR@10 {res['vr_at_10']:.3f} ({res['users']} users, "
                             f"{took:.0f} s); best {vcfg.metric} {val_state['best']:.4f} at step "
                             f"{val_state['best_step']}\n")
            sys.stdout.flush()
            if mlflow_client is not None:
                for k, x in res.items():
                    mlflow_client.log_metric(run_id, f"val/{k}", float(x), step=done)
                mlflow_client.log_metric(run_id, "val/train_minutes", point["train_minutes"], step=done)
        return bool(vcfg.patience and val_state["since_best"] >= vcfg.patience)

    def save_best(done: int, point: dict[str, Any]) -> None:
        """The best weights so far, in the checkpoint layout ``export_model`` reads (rank 0, full weights)."""
        with tempfile.TemporaryDirectory(prefix="grlm-best-") as d:
            torch.save({k: x.detach().float().cpu() for k, x in hf_model.state_dict().items()},
                       os.path.join(d, "model.pt"))
            with open(os.path.join(d, "meta.json"), "w") as f:
                json.dump({"step": done, "strategy": "ddp", "validation": point}, f)
            store.upload_dir(d, config["validation"]["best_rel"])

    fail_rank = min(1, world - 1)
    window_tokens, window_samples, window_t0 = 0, 0, time.time()
    module.train()
    console_every = t.log_every * max(1, -(-total // (5 * t.log_every))) if not config.get("verbose") else t.log_every
    for step in range(start, total):
        if faults.due(config.get("faults"), "train_step", step) and rank == fail_rank and ckpt is None:
            faults.crash("train_step", step, f"training rank {rank}")
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
                    with forward_precision():
                        out = module(**batch)
                    (out.loss / accum).backward()
            loss_sum += float(out.loss.detach())
        if not use_ds:
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(module.parameters(), t.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(hf_model)
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
            # progress on the console (forwarded to the driver by Ray): about 5 lines per training, or every
            # log window with grlm -v; MLflow gets every window
            if rank == 0 and (done == total or done % console_every == 0):
                sys.stdout.write(f"[iift] step {done}/{total} epoch {epoch} loss {metrics['loss']:.4f} "
                                 f"lr {metrics['lr']:.2e} tokens/s {metrics['tokens_per_s']:.0f}\n")
                sys.stdout.flush()
            if mlflow_client is not None:
                for k in ("loss", "lr", "tokens_per_s", "samples_per_s"):
                    mlflow_client.log_metric(run_id, f"train/{k}", float(metrics[k]), step=done)
        stop = False
        if done in every:
            t_v = time.time()
            stop = validate(done, metrics)
            window_t0 += time.time() - t_v  # throughput windows exclude validation
        if done % t.checkpoint_every == 0 or done == total or done in every:
            save(done, metrics)
        elif done % t.log_every == 0:
            # not every step: Ray Train V2 hands a report to the controller through a one-slot queue that it
            # drains on its own poll interval, so a report per step throttled training to that interval
            # (31 samples/s on Beauty with workers ~30% busy; py-spy: blocked in TrainContext._wait_then_report)
            session.report(metrics)
        if stop:
            if rank == 0:
                sys.stdout.write(f"[iift] early stop at step {done}: no better {vcfg.metric} in {vcfg.patience} "
                                 "validations\n")
            break


# --------------------------------------------------------------------------- export
def consolidated_state_dict(ckpt_dir: str) -> dict[str, Any]:
    """The full fp32 model weights of a checkpoint folder (ZeRO shards gathered, or the DDP file); the
    weight average instead where the checkpoint has one (``train.ema_decay``)."""
    import torch

    meta = json.load(open(os.path.join(ckpt_dir, "meta.json")))
    if meta["strategy"] == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = dict(get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=CKPT_TAG))
        # train.selective_logits wraps the model: its parameters are named lm.<HF name>
        state = {k[3:] if k.startswith("lm.") else k: x for k, x in state.items()}
    else:
        state = torch.load(os.path.join(ckpt_dir, "model.pt"), map_location="cpu")
    ema_file = os.path.join(ckpt_dir, EMA_FILE)
    if os.path.exists(ema_file):
        state.update(torch.load(ema_file, map_location="cpu")["shadow"])
    return state


def export_model(ckpt_dir: str, base_dir: str, out_dir: str, manifest: dict[str, Any]) -> dict[str, Any]:
    quiet_loading()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state = consolidated_state_dict(ckpt_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if model.config.tie_word_embeddings:
        # the output layer is the embedding: a separate (possibly stale) copy must not overwrite it on load
        state.pop("lm_head.weight", None)
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


def train(cfg: GrlmConfig) -> dict[str, Any]:
    store = Store(cfg.run.root, cfg.run.s3)
    t, m = cfg.train, cfg.model
    if t.strategy == "deepspeed" and t.deepspeed.zero_stage == 0:
        raise ConfigError("train.deepspeed.zero_stage=0: use train.strategy=ddp instead")
    if t.ema_decay and t.strategy == "deepspeed" and t.deepspeed.zero_stage == 3:
        raise ConfigError("train.ema_decay with ZeRO-3 is not supported (each rank holds a shard of the weights); "
                          "use ZeRO-2 or DDP")
    if t.validation.enabled and t.strategy == "deepspeed" and t.deepspeed.zero_stage == 3:
        raise ConfigError("train.validation with ZeRO-3 is not supported (each rank holds a shard of the weights); "
                          "use ZeRO-2 or DDP, or score checkpoints with grlm eval")

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
        with tempfile.TemporaryDirectory(prefix="grlm-base-") as tmp:
            if not ctx.store.exists(ctx.rel("base/config.json")):
                all_terms = term_vocabulary(terms)
                backbone = build_backbone(m, corpus_texts(cfg, sft, items, terms), tmp, all_terms,
                                          embedder=cfg.embed.model)
                ctx.store.write_json(ctx.rel("base_info.json"), backbone)
                ctx.store.upload_dir(tmp, ctx.rel("base"))
            backbone = ctx.store.read_json(ctx.rel("base_info.json"))
        cache = tempfile.mkdtemp(prefix="grlm-train-driver-")
        base_local = ctx.store.local_dir(ctx.rel("base"), cache)
        tokenizer = load_tokenizer(base_local)
        batches = tokenize_sft(tokenizer, sft, cfg, write=lambda rows: ctx.write_batches("tokens.parquet", rows))
        if batches.table is not None:  # packed rows: built whole
            ctx.write("tokens.parquet", batches.table)
        tok_seconds = time.time() - t0
        validation = None
        if t.validation.enabled:
            queries, catalog = build_validation_set(
                cfg, items, ctx.read("sequences.parquet", SEQUENCES, stage="prepare"),
                ctx.read("targets.parquet", TARGETS, stage="prepare"), terms, tokenizer)
            ctx.write("validation.parquet", queries)
            ctx.write("catalog.parquet", catalog)
            validation = {"queries_rel": ctx.rel("validation.parquet"), "catalog_rel": ctx.rel("catalog.parquet"),
                          "curve_rel": ctx.rel("validation_curve.json"), "best_rel": ctx.rel("best"),
                          "max_new_tokens": cfg.eval.max_new_tokens, "decay": cfg.eval.decay, "match": cfg.eval.match,
                          # scored as the evaluation scores (transformers backend: unless eval.renormalize)
                          "renormalize": bool(cfg.eval.renormalize),
                          "popularity": popularity_metrics(queries, catalog)}

        world = 1 if t.strategy == "single" else t.num_workers
        if t.strategy != "single":
            ray = init_ray(cfg.ray)
            cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
            if not t.use_gpu and t.num_workers * t.cpus_per_worker > cpus:
                raise ConfigError(f"train.num_workers={t.num_workers} x cpus_per_worker={t.cpus_per_worker} > {cpus} "
                                  "CPUs in the Ray cluster")
        plan = plan_steps(t, batches.stats["rows"], batches.stats["samples"], world)
        ds_cfg = deepspeed_config(t, plan["accum"], t.num_workers) if t.strategy == "deepspeed" else None
        if ds_cfg:
            ctx.store.write_json(ctx.rel("deepspeed.json"), ds_cfg)
        mlflow_info = None
        run_id = start_stage_run(cfg, STAGE, model_label(cfg)) if cfg.tracking.enabled else None
        if run_id:
            mlflow_info = {"uri": tracking_uri(cfg), "run_id": run_id}
        train_name = f"{cfg.run.name}-train-{cfg.section_hash('model', 'train')[:8]}"
        loop_config = {
            "train": t.model_dump(mode="json"), "root": ctx.store.uri(""), "s3": cfg.run.s3.model_dump(mode="json"),
            "base_rel": ctx.rel("base"), "tokens_rel": ctx.rel("tokens.parquet"), "packed": batches.packed,
            "pad_id": int(tokenizer.pad_token_id), "plan": plan, "deepspeed": ds_cfg, "mlflow": mlflow_info,
            "threads": max(1, int(t.cpus_per_worker)), "validation": validation,
            "dropout": m.dropout if m.init == "scratch" else 0.0,
            "ray_run_rel": f"{ctx.rel('ray')}/{train_name}",  # where a stopped job's checkpoints are found
            "faults": faults.spec(),  # tests only (GRLM_FAULTS), read here in the driver
            "verbose": runtime.console_verbose(),
        }
        t1 = time.time()
        if t.strategy == "single":
            result = _fit_single(ctx, t, loop_config)
        else:
            result = _fit_ray(ctx, t, loop_config, train_name)
        train_seconds = time.time() - t1
        if result.checkpoint is None:
            raise ConfigError("training finished without a checkpoint")
        final = dict(result.metrics or {})
        manifest = {
            "base_model": m.path, "init": m.init, "backbone": backbone, "chat_template": tokenizer.chat_template,
            "enable_thinking": m.enable_thinking, "prompt_version": _sft_prompt_version(ctx),
            "tid_source": _sft_terms_source(ctx), "num_terms": cfg.ctg.num_terms,
            "mlflow_run_id": run_id, "ray_train_run": train_name if t.strategy != "single" else None,
            "checkpoint": result.checkpoint.path,
            "step": final.get("step"),
        }
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
        if curve:
            _record_curve(ctx, cfg, curve, validation["popularity"], run_id)
        history = result.metrics_dataframe
        tps = history["tokens_per_s"].dropna().tolist() if history is not None and "tokens_per_s" in history else []
        sps = history["samples_per_s"].dropna().tolist() if history is not None and "samples_per_s" in history else []
        tps, sps = (tps[1:], sps[1:]) if len(tps) > 2 else (tps, sps)  # the first window includes warm-up
        ctx.info.update({
            "mlflow_run_id": run_id, "run_name": model_label(cfg), "backbone": backbone, "plan": plan,
            "tokens": batches.stats, "tokenize_seconds": round(tok_seconds, 2), "train_seconds": round(train_seconds, 2),
            "first_loss": final.get("first_loss"), "final_loss": final.get("loss"),
            "tokens_per_s": round(sum(tps) / len(tps), 1) if tps else None,
            "samples_per_s": round(sum(sps) / len(sps), 2) if sps else None, "steps": final.get("step"),
            "resumed_from_step": final.get("resumed_from_step"),
            "optimizer_digest_saved": final.get("digest_saved"), "optimizer_digest_loaded": final.get("digest_loaded"),
            "export": export, "exported": exported, "strategy": t.strategy,
            "validation": {"points": curve, "best": best, "popularity": validation["popularity"]} if curve else None,
            "zero_stage": t.deepspeed.zero_stage if t.strategy == "deepspeed" else None,
            "model_dir": ctx.store.uri(ctx.rel("model")), "checkpoint": result.checkpoint.path,
        })

    return run_stage(store, cfg.run.name, STAGE, stage_key(cfg, STAGE),
                     body, resume=cfg.run.resume, after=reads(STAGE, cfg), inputs={"sft": store.uri(f"{cfg.run.name}/sft/sft.parquet")})


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
