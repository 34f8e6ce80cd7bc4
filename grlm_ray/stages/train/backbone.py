"""The backbone a run fine-tunes: a pretrained HF folder (or GGUF), or a from-scratch Qwen3-architecture
model with a tokenizer pruned to the corpus (``model.init=scratch``), its embeddings optionally from the
sentence embedder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from grlm_ray.core.config import ModelConfig
from grlm_ray.core.errors import ConfigError
from grlm_ray.lib.generation import gguf_to_hf
from grlm_ray.lib.models import quiet_loading, resolve_model_path
from grlm_ray.lib.vocab import add_term_tokens, prune_tokenizer

if TYPE_CHECKING:
    from pathlib import Path

    from grlm_ray.core.config import GrlmConfig


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}


def check_backbone(cfg: "GrlmConfig") -> list[str]:
    """``model.init=pretrained`` / ``reinit`` (the train stage's declared check, before any work): ``model.path`` is a causal
    LM, and its training state fits the memory of the workers that will hold it — fp32 weights, gradients and
    Adam's two moments, 16 bytes a parameter, each sharded over the workers as the strategy does (DDP: none,
    ZeRO-2: gradients and moments, ZeRO-3: all). Memory is known for a local Ray head (this machine's, split
    over ``train.num_workers``); on a cluster the check is left to the workers. A GGUF is checked when
    converted."""
    import json
    from pathlib import Path

    m, t = cfg.model, cfg.train
    if m.init == "scratch":
        return []
    try:
        path = Path(resolve_model_path(m.path))
    except ConfigError as e:
        return [f"model.path: {e}"]
    if path.suffix == ".gguf":
        return []
    conf_file = path / "config.json"
    if not conf_file.is_file():
        return [f"model.path: {path} is not a Hugging Face model folder (no config.json)"]
    conf = json.loads(conf_file.read_text())
    archs = conf.get("architectures") or []
    if not any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return [f"model.path: {path} is not a causal LM (architectures: {archs or 'none'}, model_type: "
                f"{conf.get('model_type')!r}); IIFT fine-tunes a decoder that writes text (e.g. Qwen3ForCausalLM)"]
    params = _parameter_count(path, conf)
    if params is None or cfg.ray.address is not None:
        return []
    import psutil

    workers = 1 if t.strategy == "single" else t.num_workers
    zero = t.deepspeed.zero_stage if t.strategy == "deepspeed" else 0
    # bytes a parameter per worker: weights 4, gradients 4, Adam moments 8, sharded as the ZeRO stage shards them
    per_param = {0: 16, 1: 4 + 4 + 8 / workers, 2: 4 + (4 + 8) / workers, 3: 16 / workers}[zero]
    need = params * per_param
    have = psutil.virtual_memory().total / workers
    if need > have:
        return [f"model.path: {path.name} has {params / 1e9:.2f}B parameters; training it needs ~{need / 2**30:.1f} "
                f"GiB per worker (fp32 weights, gradients and Adam moments, {per_param:.1f} bytes a parameter with "
                f"train.strategy={t.strategy}" + (f", zero_stage={zero}" if zero else "") + f", train.num_workers="
                f"{workers}), more than the {have / 2**30:.1f} GiB each has here: a smaller backbone, more workers "
                f"or ZeRO-3 (train.deepspeed.zero_stage=3)"]
    return []


def _parameter_count(path: "Path", conf: dict[str, Any]) -> int | None:
    """Parameters of a model folder from its weight files' sizes (the safetensors index's total size when
    sharded) and its dtype; None when there are no weight files."""
    import json

    per = _DTYPE_BYTES.get(str(conf.get("torch_dtype") or conf.get("dtype") or "float32"), 4)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        total = (json.loads(index.read_text()).get("metadata") or {}).get("total_size")
        if total:
            return int(total) // per
    files = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
    return sum(f.stat().st_size for f in files) // per if files else None


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
    elif m.init == "reinit":
        from transformers import AutoConfig

        torch.manual_seed(m.seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
        info["seed"] = m.seed
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
