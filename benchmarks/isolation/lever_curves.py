"""Collect the validation curves of several training runs (one lever each) into one results file + plot.

Each run's ``<run>/train/validation_curve.json`` (written by training with ``train.validation``) holds R@K /
N@K of the same seeded validation users at every validation point; runs that share ``validation.users`` and
``validation.seed`` are scored on the same users, so their curves compare point by point.

    python benchmarks/isolation/lever_curves.py --name quality_levers2_beauty \
        --arm "recipe (exp-r4, DDP x2)=/tmp/exp3/runs/exp-r4" --arm "EMA 0.999=/tmp/exp3/runs/x-ema" \
        --protocol "1-core arms ..." --note "x-ema stopped by hand at epoch 9"

Writes benchmarks/results/<name>.json and <name>.png (R@10 and N@10 vs epoch).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def load_arm(spec: str) -> tuple[str, dict]:
    label, _, path = spec.partition("=")
    if not path:
        raise SystemExit(f"--arm needs LABEL=RUN_DIR, got {spec!r}")
    run = Path(path).expanduser()
    curve_file = run / "train" / "validation_curve.json"
    if not curve_file.exists():
        raise SystemExit(f"{curve_file}: no validation curve (was train.validation enabled?)")
    points = json.loads(curve_file.read_text())
    cfg_file = run / "config.yaml"
    return label, {"run": str(run), "points": points, "config": cfg_file.read_text() if cfg_file.exists() else None}


def plot(arms: dict[str, dict], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("recall_at_10", "ndcg_at_10")):
        for label, arm in arms.items():
            pts = arm["points"]
            ax.plot([p["epoch"] for p in pts], [p[metric] for p in pts], marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric.replace("_at_", "@").replace("recall", "R").replace("ndcg", "N") + " (validation)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="results file stem under benchmarks/results/")
    ap.add_argument("--arm", action="append", required=True, help="LABEL=RUN_DIR (repeat)")
    ap.add_argument("--title", default="validation curves by lever (Beauty)")
    ap.add_argument("--protocol", default="", help="how the arms were run (recorded)")
    ap.add_argument("--note", action="append", default=[], help="anything a reader must know (repeat)")
    args = ap.parse_args()
    arms = dict(load_arm(a) for a in args.arm)
    users = {a["points"][0].get("users") for a in arms.values() if a["points"]}
    if len(users) > 1:
        raise SystemExit(f"the arms were scored on different numbers of validation users: {sorted(users)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"benchmark": args.title, "protocol": args.protocol, "notes": args.note,
           "machine": {"platform": platform.platform(), "python": platform.python_version()},
           "arms": {label: {"run": a["run"], "points": a["points"], "best_ndcg_at_10": max(
               (p["ndcg_at_10"] for p in a["points"]), default=None), "config": a["config"]}
               for label, a in arms.items()}}
    from grlm_ray.bench.common import portable  # no machine paths in a committed result
    (RESULTS / f"{args.name}.json").write_text(json.dumps(portable(out), indent=1))
    plot(arms, args.title, RESULTS / f"{args.name}.png")
    for label, a in arms.items():
        print(f"{label:40s} " + "  ".join(f"ep{p['epoch']:g} {p['recall_at_10']:.3f}/{p['ndcg_at_10']:.4f}"
                                          for p in a["points"]))


if __name__ == "__main__":
    main()
