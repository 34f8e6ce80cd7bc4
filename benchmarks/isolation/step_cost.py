"""What a training step of each config costs on this machine, measured side by side in one process (run it on
otherwise idle cores): each config's training for ``--steps`` steps with validation off, its upstream stages
copied from the config's own run when finished there (or made), then seconds per step on the training loop's
clock and from the throughput windows (warm-up left out), and the config's full schedule projected at that
rate. For "is one joint model cheaper to train than one model per domain?" when the recorded trainings ran
beside other work, and for what a compressed vocabulary saves per step.

    python benchmarks/isolation/step_cost.py configs/bench/joint_quality.yaml configs/bench/beauty_quality.yaml \\
        [--steps 150] [--from configs/bench/joint_quality.yaml=bench-joint ...] [--set key=value ...] [--name N]

``--from CONFIG=RUN``: the finished run whose stages through SFT are copied (default: the config's own
``run.name``). Each measurement trains in a run of its own (``<run>-steps``); nothing of the source run is
changed. Writes benchmarks/results/<NAME>.json (default ``step_cost``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def measure(cfg, source: str, steps: int) -> dict:
    """Train ``cfg`` for ``steps`` steps in run ``<name>-steps`` (stages through SFT copied from ``source``)."""
    from grlm_ray.core.config import GrlmConfig
    from grlm_ray.core.registry import upstream
    from grlm_ray.core.run import Run
    from grlm_ray.core.storage import copy_stages, read_manifest
    from grlm_ray.flows.pipeline import run_pipeline

    data = cfg.model_dump(mode="json")
    data["run"]["name"] = f"{cfg.run.name}-steps"
    data["train"]["max_steps"] = steps
    data["train"]["validation"]["enabled"] = False
    data["tracking"]["enabled"] = False
    short = GrlmConfig.model_validate(data)
    store = Run.of(short).store
    copied = copy_stages(store, source, short.run.name, [s for s in upstream("train", short) if s != "train"])
    t0 = time.time()
    run_pipeline(short, stages=upstream("train", short))
    info = read_manifest(store, short.run.name, "train")["info"]
    plan = info["plan"]
    per_step_clock = info["train_seconds"] / info["steps"]
    per_step_windows = plan["rows_per_step"] / info["samples_per_s"] if info.get("samples_per_s") else None
    full = int(plan["steps_per_epoch"] * cfg.train.epochs) if not cfg.train.max_steps else cfg.train.max_steps
    rate = per_step_windows or per_step_clock
    return {"config_run": cfg.run.name, "copied_from": source, "stages_copied": copied, "steps": info["steps"],
            "rows_per_step": plan["rows_per_step"], "steps_per_epoch": plan["steps_per_epoch"],
            "seconds_per_step_clock": round(per_step_clock, 4),
            "seconds_per_step_windows": round(per_step_windows, 4) if per_step_windows else None,
            "tokens_per_s": info.get("tokens_per_s"),
            "full_schedule_steps": full, "full_schedule_minutes": round(full * rate / 60, 1),
            "wall_seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--from", dest="sources", nargs="*", default=[], metavar="CONFIG=RUN")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every config")
    ap.add_argument("--name", default="step_cost")
    args = ap.parse_args()

    from grlm_ray.bench.common import format_table, write_result
    from grlm_ray.core.config import load_config

    sources = dict(s.split("=", 1) for s in args.sources)
    rows = []
    for path in args.configs:
        cfg = load_config(path, list(args.set))
        row = {"config": path, **measure(cfg, sources.get(path, cfg.run.name), args.steps)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ["config", "steps", "seconds_per_step_clock", "seconds_per_step_windows", "tokens_per_s",
            "full_schedule_steps", "full_schedule_minutes"]
    print(format_table(rows, cols))
    out = write_result("step_cost", {"rows": rows, "steps": args.steps, "command": " ".join(
        ["python benchmarks/isolation/step_cost.py", *args.configs, "--steps", str(args.steps),
         *(["--from", *args.sources] if args.sources else []), *(["--set", *args.set] if args.set else [])])},
        RESULTS, args.name)
    print(f"written {out}")


if __name__ == "__main__":
    main()
