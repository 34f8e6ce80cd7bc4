"""Model paths from config: a local folder, or ``pkg://<module>/<subdir>`` inside an installed wheel."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from grlm_ray.core.errors import ConfigError


def resolve_model_path(spec: str) -> str:
    """Return a local folder for ``spec``; nothing is ever downloaded (no model hub here)."""
    if spec.startswith("pkg://"):
        module, _, sub = spec[len("pkg://"):].partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise ConfigError(f"model {spec!r}: the package {module!r} is not installed "
                              f"(pip install {module.replace('_', '-')})")
        path = Path(list(found.submodule_search_locations)[0]) / sub
    else:
        path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"model path not found: {path} (from {spec!r}); models are read from local "
                          f"folders or installed packages, never downloaded at run time")
    return str(path)


def quiet_loading() -> None:
    """No weight-loading / shard-writing progress bars from transformers and the hub in this process (they
    print per load, in every Ray worker); ``grlm -v`` (GRLM_VERBOSE=1) keeps them. Called where models load."""
    if os.environ.get("GRLM_VERBOSE") == "1":
        return
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    hub_utils.disable_progress_bars()
    hf_logging.disable_progress_bar()


# what a tokenizer folder saved by this project's vocabulary pruning holds (``lib/vocab.py``)
_LEAN_CONFIG_KEYS = frozenset({"backend", "bos_token", "eos_token", "pad_token", "unk_token", "model_max_length",
                               "tokenizer_class", "is_local", "local_files_only", "chat_template",
                               "added_tokens_decoder", "clean_up_tokenization_spaces"})


def load_tokenizer(path: str, lean_above: int = 1000):
    """``AutoTokenizer.from_pretrained(path)``, made lean for the tokenizers this project writes.

    transformers 5 turns every added token into Python objects (deep-copied twice) when it loads a folder:
    ~280 MB and 4.6 s for the 96k term tokens of a 300k-item catalog (``grlm bench scale``), in every process
    that loads the model, against ~110 MB and 1 s for the same ``tokenizers.Tokenizer`` wrapped directly. A folder with more than ``lean_above`` added tokens whose
    config holds only what our pruned tokenizers save is loaded that way (same ids, specials and chat
    template: tested); anything else goes through ``AutoTokenizer``."""
    import json

    from transformers import AutoTokenizer

    folder = Path(path)
    spec_file, conf_file = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not spec_file.is_file() or not conf_file.is_file():
        return AutoTokenizer.from_pretrained(path)
    conf = json.loads(conf_file.read_text())
    if not set(conf) <= _LEAN_CONFIG_KEYS or conf.get("tokenizer_class") not in (
            "PreTrainedTokenizerFast", "TokenizersBackend"):
        return AutoTokenizer.from_pretrained(path)
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(spec_file))
    if len(backend.get_added_tokens_decoder()) <= lean_above:
        return AutoTokenizer.from_pretrained(path)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = conf.get(attr)
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None:
            setattr(tok, attr, value)
    if "model_max_length" in conf:
        tok.model_max_length = conf["model_max_length"]
    if "clean_up_tokenization_spaces" in conf:
        tok.clean_up_tokenization_spaces = conf["clean_up_tokenization_spaces"]
    template = folder / "chat_template.jinja"
    tok.chat_template = template.read_text() if template.is_file() else conf.get("chat_template")
    tok.name_or_path = str(path)
    return tok


def set_torch_threads(threads: int) -> None:
    """torch on ``threads`` threads in the calling OS thread. Under OpenMP the count is per OS thread: a worker
    thread (``asyncio.to_thread``, a thread pool) starts at the process default (Ray sets OMP_NUM_THREADS=1
    below 2 CPUs), so code that runs torch in such a thread sets it there, not only once at start-up."""
    import torch

    torch.set_num_threads(max(1, threads))
