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
