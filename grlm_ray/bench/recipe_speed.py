"""IIFT throughput of the CPU quality recipe: fp32 vs bf16 autocast, 2 DDP workers vs one process.

    grlm bench recipe-speed [--config configs/bench/beauty_quality.yaml] [--steps 60]

Same SFT data and tokens (the recipe's: TIDs only, one token per term), same from-scratch model, same
optimizer steps; only ``train.precision`` and ``train.strategy`` change (single: one process with as many
threads as the DDP run has workers). Rates are measured inside the training loop (real tokens and samples
per second, windows of ``log_every`` steps), side by side in one run, validation off. Writes
benchmarks/results/recipe_speed.json with the machine description.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

from grlm_ray.bench.common import DEFAULT_SHARED, REPO, ratio

SETTINGS = (("ddp", "fp32"), ("ddp", "bf16"), ("single", "fp32"), ("single", "bf16"))


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", default=str(REPO / "configs" / "bench" / "beauty_quality.yaml"))
    ap.add_argument("--data", default=DEFAULT_SHARED, help="amazon2014 bundle folder")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--cpus", type=int, default=2, help="DDP workers = threads of the single process")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from grlm_ray.core.config import load_config
    from grlm_ray.flows.pipeline import run_pipeline, upstream

    rows = []
    with tempfile.TemporaryDirectory() as root:
        base = ["run.name=bench", f"run.root={root}", f"data.base_dir={args.data}", "tracking.enabled=false",
                "ray.progress_bars=false", f"ray.num_cpus={args.cpus}", "train.validation.enabled=false",
                f"train.max_steps={args.steps}", f"train.log_every={max(1, args.steps // 6)}",
                f"train.checkpoint_every={args.steps}"]
        cfg = load_config(args.config, base)
        run_pipeline(cfg, stages=upstream("sft", cfg))
        for strategy, precision in SETTINGS:
            workers = [f"train.num_workers={args.cpus}", "train.cpus_per_worker=1"] if strategy == "ddp" else \
                ["train.num_workers=1", f"train.cpus_per_worker={args.cpus}"]
            c = load_config(args.config, base + workers + [f"train.strategy={strategy}", f"train.precision={precision}"])
            info = run_pipeline(c, stages=("train",))["stages"]["train"]["info"]
            rows.append({"strategy": strategy, "precision": precision, "steps": info["steps"],
                         "tokens_per_s": info["tokens_per_s"], "samples_per_s": info["samples_per_s"],
                         "train_seconds": info["train_seconds"], "final_loss": round(info["final_loss"], 4)})
    by = {(r["strategy"], r["precision"]): r for r in rows}
    ratios = {
        "bf16_vs_fp32_ddp": ratio(by[("ddp", "bf16")]["samples_per_s"], by[("ddp", "fp32")]["samples_per_s"]),
        "bf16_vs_fp32_single": ratio(by[("single", "bf16")]["samples_per_s"], by[("single", "fp32")]["samples_per_s"]),
        "single_vs_ddp_bf16": ratio(by[("single", "bf16")]["samples_per_s"], by[("ddp", "bf16")]["samples_per_s"]),
    }
    return {"config": str(args.config), "cpus": args.cpus, "rows": rows, "ratios": ratios,
            "note": "bf16 = torch.autocast (fp32 weights, optimizer and loss); the CPU's avx512_bf16 / AMX "
                    "decides whether it is faster"}
