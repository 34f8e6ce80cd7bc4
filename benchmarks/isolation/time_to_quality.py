"""Time to quality: validation R@10 / N@10 against training minutes for GRLM and SASRec arms on one plot, and
the best R@10 / N@10 each arm had reached by 15 / 30 / 60 / 90 training minutes (issue #32, item 3). With
``--x tokens`` the same against training tokens (real tokens, every worker's; GRLM runs record them at each
validation since 2026-12-03), marks in millions (``--marks``): arms of different backbones at equal tokens
(issue #35, part 3).

An arm is LABEL=SOURCE, where SOURCE is
- a GRLM run folder (its ``train/validation_curve.json``, written with ``train.validation``),
- a baseline run folder (its ``baseline/_manifest.json``: SASRec's ``validation_curve`` with
  ``baseline.validation.users``), or
- a quality-bench result file and a model name, ``results.json#GRLM`` (its ``validation_curves``), or
- a curve file: a run's ``train/validation_curve.json`` kept on its own (e.g. under benchmarks/results), so arms
  trained in different sessions or on different machines compare without their run folders.

Arms compare point by point when they share the validation sample (``users`` and ``seed``: GRLM's
``train.validation`` and SASRec's ``baseline.validation`` pick the same users with the same settings).
Training minutes exclude validation; they are what each run measured on its own cores (say in --protocol
when arms shared the machine).

    python benchmarks/isolation/time_to_quality.py --name time_to_quality_beauty \
        --arm "GRLM recipe (exp-nn)=benchmarks/results/quality_exp-nn_full.json#GRLM" \
        --arm "SASRec-CE=/work/runs/sas-s2" --protocol "..."

``--popularity RUN`` adds the floor: popularity (training interactions) scored on the validation users a GRLM run
folder drew (its ``train/validation.parquet``; arms that share the sample share the floor).

Writes benchmarks/results/<name>.json and <name>.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
MARKS = (15, 30, 60, 90)


def load_arm(spec: str) -> tuple[str, dict[str, Any]]:
    label, _, source = spec.rpartition("=")  # a label may hold "=", a path does not
    if not source:
        raise SystemExit(f"--arm needs LABEL=SOURCE, got {spec!r}")
    path, _, model = source.partition("#")
    p = Path(path).expanduser()
    if model:
        curves = json.loads(p.read_text()).get("validation_curves") or {}
        if model not in curves:
            raise SystemExit(f"{p}: no validation curve for {model!r} (has {sorted(curves)})")
        points = curves[model]
    elif p.is_file():
        points = json.loads(p.read_text())
        if not isinstance(points, list):
            raise SystemExit(f"{p}: a curve file holds a JSON list of validation points, got {type(points).__name__}"
                             " (a quality-bench result needs '#MODEL')")
    elif (p / "train" / "validation_curve.json").exists():
        points = json.loads((p / "train" / "validation_curve.json").read_text())
    elif (p / "baseline" / "_manifest.json").exists():
        points = json.loads((p / "baseline" / "_manifest.json").read_text())["info"].get("validation_curve") or []
    else:
        raise SystemExit(f"{p}: neither a GRLM run with train/validation_curve.json nor a baseline run")
    if not points:
        raise SystemExit(f"{source}: the curve is empty (was validation enabled?)")
    try:
        shown = str(p.resolve().relative_to(ROOT))
    except ValueError:
        shown = p.name  # a run folder outside the checkout: its name only (no machine paths in results)
    return label, {"source": shown + (f"#{model}" if model else ""), "points": points}


def _shown(source: str) -> str:
    """A source as the results file records it: repo files as they are, run folders as ``<root>/<name>``."""
    return source if "#" in source or "/" in source else f"<root>/{source}"


UNITS = {"minutes": ("train_minutes", 1.0, "min"), "tokens": ("train_tokens", 1e6, "M")}


def reached(points: list[dict[str, Any]], mark: float, metric: str, x: str = "minutes") -> float | None:
    """The best ``metric`` among the validations done within ``mark`` training minutes (or millions of training
    tokens, ``x="tokens"``); None: none yet."""
    key, scale, _ = UNITS[x]
    done = [p[metric] for p in points if p[key] / scale <= mark]
    return max(done) if done else None


def table(arms: dict[str, dict[str, Any]], marks: tuple[float, ...] = MARKS, x: str = "minutes") -> list[dict[str, Any]]:
    key, scale, unit = UNITS[x]
    for label, arm in arms.items():
        if any(key not in p for p in arm["points"]):
            raise SystemExit(f"arm {label!r}: its validation points have no {key!r} (a run from before it was "
                             f"recorded: retrain it, or compare with --x minutes)")
    rows = []
    for label, arm in arms.items():
        pts = arm["points"]
        best = max(pts, key=lambda p: p["ndcg_at_10"])
        rows.append({"arm": label, **{f"r10_by_{m:g}{unit}": reached(pts, m, "recall_at_10", x) for m in marks},
                     **{f"n10_by_{m:g}{unit}": reached(pts, m, "ndcg_at_10", x) for m in marks},
                     "best_r10": best["recall_at_10"], "best_n10": best["ndcg_at_10"],
                     "best_at_min": best["train_minutes"], "best_epoch": best.get("epoch"),
                     **({"best_at_tokens": best["train_tokens"], "tokens_run": pts[-1]["train_tokens"]}
                        if x == "tokens" else {}),
                     "minutes_run": pts[-1]["train_minutes"]})
    return rows


def popularity_floor(run: Path, ks: tuple[int, ...] = (5, 10)) -> dict[str, Any]:
    """Popularity (items by training interaction count) scored on the validation targets run ``run`` drew:
    the same users, targets and metric code as its validation curve."""
    import pyarrow.parquet as pq

    from grlm_ray.lib.metrics import score_rankings
    from grlm_ray.lib.protocol import training_popularity

    files = [run / "prepare" / "sequences.parquet", run / "prepare" / "targets.parquet",
             run / "train" / "validation.parquet"]
    for f in files:
        if not f.exists():
            raise SystemExit(f"--popularity {run}: {f.relative_to(run)} is missing (a GRLM run with train.validation)")
    seqs, targets, valid = (pq.read_table(f) for f in files)
    ranked = training_popularity(seqs, targets)[: max(ks)]
    rows = [{"target_item_id": t, "ranked_item_ids": ranked, "grounded_by": []}
            for t in valid.column("target_item_id").to_pylist()]
    m = score_rankings(rows, ks)["overall"]
    return {"users": len(rows), **{k: v for k, v in m.items() if k.startswith(("recall_", "ndcg_"))}}


def plot(arms: dict[str, dict[str, Any]], title: str, out: Path, x: str = "minutes",
         floor: dict[str, Any] | None = None) -> None:
    """The quality bench's learning-curve plot (R@10 and N@10 against training minutes or tokens), one line an
    arm; the popularity floor dashed."""
    from grlm_ray.bench.quality import plot_curves

    out.write_bytes(plot_curves({label: arm["points"] for label, arm in arms.items()}, title, x=x,
                                floors={f"popularity ({floor['users']} users)": floor} if floor else None))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--arm", action="append", required=True, help="LABEL=SOURCE (see the module docstring)")
    ap.add_argument("--protocol", default="")
    ap.add_argument("--note", default="")
    ap.add_argument("--popularity", type=Path, default=None,
                    help="a GRLM run folder: popularity scored on the validation users it drew (the arms' floor)")
    ap.add_argument("--x", choices=sorted(UNITS), default="minutes", help="the curves' x axis and the marks' unit")
    ap.add_argument("--marks", type=float, nargs="+", default=None,
                    help=f"where the table reads each curve (default: {' '.join(map(str, MARKS))} minutes; with "
                         "--x tokens, millions of tokens: required)")
    args = ap.parse_args(argv)
    if args.x == "tokens" and not args.marks:
        ap.error("--x tokens needs --marks (millions of training tokens, e.g. --marks 2 5 10 20)")
    marks = tuple(args.marks or MARKS)
    sys.path.insert(0, str(ROOT))
    from grlm_ray.bench.common import describe, portable

    arms = dict(load_arm(a) for a in args.arm)
    rows = table(arms, marks, args.x)
    floor = popularity_floor(args.popularity) if args.popularity else None
    unit = UNITS[args.x][2]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"name": args.name, "protocol": args.protocol, "note": args.note, "x": args.x,
           "marks_million_tokens" if args.x == "tokens" else "marks_min": list(marks),
           "rows": rows, "arms": arms, "machine": describe(), **({"popularity": floor} if floor else {}),
           "command": "python benchmarks/isolation/time_to_quality.py --name " + args.name + " " + " ".join(
               "--arm " + repr(f"{label}={_shown(arm['source'])}") for label, arm in arms.items())
           + ("" if args.x == "minutes" and args.marks is None else
              f" --x {args.x} --marks {' '.join(f'{m:g}' for m in marks)}")
           + (f" --popularity <root>/{args.popularity.name}" if args.popularity else "")}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(portable(out), indent=1))
    plot(arms, args.name, RESULTS / f"{args.name}.png", x=args.x, floor=floor)
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"{'arm':40s} " + " ".join(f"R@10<={m:g}{unit}" for m in marks) + "   best R@10 / N@10 (min)")
    for r in rows:
        print(f"{r['arm'][:40]:40s} " + " ".join(f"{fmt(r[f'r10_by_{m:g}{unit}']):>9s}" for m in marks)
              + f"   {r['best_r10']:.4f} / {r['best_n10']:.4f} ({r['best_at_min']:.1f})")
    if floor:
        print(f"{'popularity (the same validation users)':40s} "
              f"R@10 / N@10 {floor['recall_at_10']:.4f} / {floor['ndcg_at_10']:.4f} ({floor['users']} users)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
