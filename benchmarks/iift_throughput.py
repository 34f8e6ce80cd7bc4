"""IIFT throughput on real data: packed vs padded (length-bucketed) batches, and 1 vs 2 DDP workers.

    .venv/bin/python benchmarks/iift_throughput.py --steps 20      (needs ../shared/data/amazon2014)

Same SFT data (Amazon Beauty, the authors' TIDs with collisions resolved), same from-scratch model, same
optimizer steps; only the batching or the worker count changes. Rates are measured inside the workers
(real, non-padding tokens and samples per second, the warm-up window dropped), side by side in one run.
Writes benchmarks/results/iift_throughput.json with the machine description and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import describe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "amazon2014"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(HERE / "results" / "iift_throughput.json"))
    args = ap.parse_args()

    from grlm_ray.config import load_config
    from grlm_ray.pipeline import run_pipeline, upstream

    settings = [("packed", 1, True), ("padded", 1, False), ("packed", 2, True)]
    rows = []
    with tempfile.TemporaryDirectory() as root:
        base = ["run.name=bench", f"run.root={root}", f"data.base_dir={args.data}", "tracking.enabled=false",
                "ray.progress_bars=false", "sft.terms=provided", "sft.missing_terms=words", "model.hidden_size=128", "model.num_layers=2",
                "model.num_heads=2", "model.num_kv_heads=1", "model.intermediate_size=384",
                "train.global_batch=64", "train.micro_batch=8", "train.block_size=512", "train.max_length=512",
                f"train.max_steps={args.steps}", f"train.log_every={max(1, args.steps // 5)}",
                f"train.checkpoint_every={args.steps}", "train.warmup_ratio=0"]
        cfg = load_config(HERE.parent / "configs" / "beauty.yaml", base)
        run_pipeline(cfg, stages=upstream("sft", cfg))
        for name, workers, packing in settings:
            c = load_config(HERE.parent / "configs" / "beauty.yaml",
                            base + [f"train.num_workers={workers}", f"train.packing={str(packing).lower()}"])
            info = run_pipeline(c, stages=("train",))["stages"]["train"]["info"]
            rows.append({"batching": name, "workers": workers, "steps": info["steps"],
                         "tokens_per_s": info["tokens_per_s"], "samples_per_s": info["samples_per_s"],
                         "padding_waste": info["tokens"]["padding_waste"], "rows": info["tokens"]["rows"],
                         "samples": info["tokens"]["samples"], "train_seconds": info["train_seconds"],
                         "final_loss": round(info["final_loss"], 4)})
    by = {(r["batching"], r["workers"]): r for r in rows}
    ratios = {
        "packed_vs_padded_tokens_per_s": round(by[("packed", 1)]["tokens_per_s"] / by[("padded", 1)]["tokens_per_s"], 3),
        "ddp_2_vs_1_samples_per_s": round(by[("packed", 2)]["samples_per_s"] / by[("packed", 1)]["samples_per_s"], 3),
    }
    result = {"benchmark": "iift_throughput", "machine": describe(), "data": "amazon2014/beauty (bundle, provided TIDs)",
              "model": "scratch Qwen3 2x128, SmolLM2 tokenizer pruned", "rows": rows, "ratios": ratios,
              "goals": {"packed_vs_padded_tokens_per_s": ">= 1.5"}}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'batching':8s} {'workers':>7s} {'tokens/s':>9s} {'samples/s':>9s} {'padding':>8s} {'loss':>7s}")
    for r in rows:
        print(f"{r['batching']:8s} {r['workers']:7d} {r['tokens_per_s']:9.0f} {r['samples_per_s']:9.1f} "
              f"{r['padding_waste']:8.1%} {r['final_loss']:7.3f}")
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
