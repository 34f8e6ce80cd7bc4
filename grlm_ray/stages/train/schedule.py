"""How many steps, how rows are split over workers and micro batches, the learning-rate schedule, the
DeepSpeed config."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from grlm_ray.core.config import TrainConfig
from grlm_ray.core.errors import ConfigError

if TYPE_CHECKING:
    from grlm_ray.core.config import GrlmConfig

log = logging.getLogger(__name__)


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


def native_bf16(use_gpu: bool) -> bool:
    """Whether bf16 math runs natively here: a CUDA device that supports it, or a CPU with avx512_bf16 / AMX
    (``/proc/cpuinfo``); elsewhere torch emulates bf16 at a fraction of fp32's speed."""
    if use_gpu:
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return any(x in flags for x in ("avx512_bf16", "amx_bf16"))


def resolve_precision(t: TrainConfig, *, warn: bool = True) -> str:
    """``train.precision`` as it will run: ``auto`` -> bf16 where native (``native_bf16``), else fp32. An explicit
    bf16 without native support is kept, with a warning (it is slow, not wrong)."""
    if t.precision == "fp32":
        return "fp32"
    native = native_bf16(t.use_gpu)
    if t.precision == "auto":
        return "bf16" if native else "fp32"
    if warn and t.precision == "bf16" and not native:
        log.warning("train.precision=bf16 on a %s without native bf16: torch emulates it (measured 45x slower matmuls "
                    "than fp32 on an AVX2-only CPU); train.precision=auto picks fp32 here", "GPU" if t.use_gpu else "CPU")
    return t.precision


def resolved(cfg: "GrlmConfig", *, warn: bool = False) -> "GrlmConfig":
    """The config the train stage runs (and keys its result) with: ``train.precision=auto`` resolved on this
    machine. ``registry.stage_key`` hashes the same, so a resubmitted job finds its half-done training."""
    precision = resolve_precision(cfg.train, warn=warn)
    if precision == cfg.train.precision:
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": precision})})


def keyed(cfg: "GrlmConfig") -> "GrlmConfig":
    """What the train stage's key hashes: the ``resolved`` config, ``train.members`` left out (the run's own
    model is member 0 whatever their number: asking for more members trains only the new ones)."""
    cfg = resolved(cfg)
    if cfg.train.members == 1:
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"members": 1})})


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
