"""IIFT throughput on real data: packed vs padded (length-bucketed) batches, and 1 vs 2 DDP workers.

    grlm bench training [--steps 20] [--data ../shared/data/amazon2014]

Same SFT data (Amazon Beauty, the authors' TIDs with collisions resolved), same from-scratch model, same
optimizer steps; only the batching or the worker count changes. Rates are measured inside the workers
(real, non-padding tokens and samples per second, the warm-up window dropped), side by side in one run.
Writes benchmarks/results/training.json with the machine description and prints a table.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

from grlm_ray.bench.common import DEFAULT_SHARED, REPO, ratio


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", default=DEFAULT_SHARED, help="amazon2014 bundle folder")
    ap.add_argument("--steps", type=int, default=20)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from grlm_ray.core.config import load_config
    from grlm_ray.flows.pipeline import run_pipeline, upstream

    settings = [("packed", 1, True), ("padded", 1, False), ("packed", 2, True), ("padded", 2, False)]
    rows = []
    with tempfile.TemporaryDirectory() as root:
        base = ["run.name=bench", f"run.root={root}", f"data.base_dir={args.data}", "tracking.enabled=false",
                "ray.progress_bars=false", "sft.terms=provided", "sft.missing_terms=words", "model.hidden_size=128", "model.num_layers=2",
                "model.num_heads=2", "model.num_kv_heads=1", "model.intermediate_size=384",
                "train.global_batch=64", "train.micro_batch=8", "train.block_size=512", "train.max_length=512",
                f"train.max_steps={args.steps}", f"train.log_every={max(1, args.steps // 5)}",
                f"train.checkpoint_every={args.steps}", "train.warmup_ratio=0"]
        cfg = load_config(REPO / "configs" / "beauty.yaml", base)
        run_pipeline(cfg, stages=upstream("sft", cfg))
        for name, workers, packing in settings:
            c = load_config(REPO / "configs" / "beauty.yaml",
                            base + [f"train.num_workers={workers}", f"train.packing={str(packing).lower()}"])
            info = run_pipeline(c, stages=("train",))["stages"]["train"]["info"]
            rows.append({"batching": name, "workers": workers, "steps": info["steps"],
                         "tokens_per_s": info["tokens_per_s"], "samples_per_s": info["samples_per_s"],
                         "padding_waste": info["tokens"]["padding_waste"], "rows": info["tokens"]["rows"],
                         "samples": info["tokens"]["samples"], "train_seconds": info["train_seconds"],
                         "final_loss": round(info["final_loss"], 4)})
    by = {(r["batching"], r["workers"]): r for r in rows}
    ratios = {
        "packed_vs_padded_tokens_per_s": ratio(by[("packed", 1)]["tokens_per_s"], by[("padded", 1)]["tokens_per_s"]),
        "packed_vs_padded_samples_per_s_2_workers": ratio(by[("packed", 2)]["samples_per_s"],
                                                          by[("padded", 2)]["samples_per_s"]),
        "ddp_2_vs_1_samples_per_s_packed": ratio(by[("packed", 2)]["samples_per_s"], by[("packed", 1)]["samples_per_s"]),
        "ddp_2_vs_1_samples_per_s_padded": ratio(by[("padded", 2)]["samples_per_s"], by[("padded", 1)]["samples_per_s"]),
    }
    return {"data": "amazon2014/beauty (bundle, provided TIDs)", "model": "scratch Qwen3 2x128, SmolLM2 tokenizer pruned",
            "rows": rows, "ratios": ratios, "goals": {"packed_vs_padded_tokens_per_s": ">= 1.5"}}
