"""What wraps the model during training: residual dropout hooks, the label-positions-only loss, the
weight average (``train.ema_decay``), the optimizer-state digest that proves a resume restored it whole."""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

from grlm_ray.core.errors import ConfigError
from grlm_ray.lib.tokens import IGNORE


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


class _Output(NamedTuple):
    """The wrapper's output: a named tuple, so ZeRO-3's module hooks find the loss tensor in it (they walk
    tuples, lists, dicts and tensors; a plain object made DeepSpeed warn that its backward hooks "may not get
    triggered properly" for the outermost module)."""

    loss: Any


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
    total = 0.0  # summed on each state's own device (the optimizer's state lives on the GPU there)
    for state in inner.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                total += float(state[key].detach().double().abs().sum())
    if partitioned and torch.distributed.is_initialized():
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
        summed = torch.tensor(total, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(summed)
        total = float(summed)
    return total
