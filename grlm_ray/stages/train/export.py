"""The exported model: a checkpoint's full fp32 weights (ZeRO shards gathered; the weight average where
there is one) saved as an HF folder next to the tokenizer and ``grlm_model.json``."""

from __future__ import annotations

import json
import os
from typing import Any

from grlm_ray.core.errors import ConfigError
from grlm_ray.lib.models import quiet_loading
from grlm_ray.stages.train.sessions import CKPT_TAG, EMA_FILE


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
