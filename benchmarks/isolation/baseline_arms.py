"""Collect SASRec tuning arms (``grlm baseline`` runs) into one results file: each arm's validation curve and
best epoch (``baseline.validation``), its settings, and — when given — the score of its kept model on the
test split (a second run with ``eval.split=test`` that reuses the cached model; the test split is scored
once per final setting).

    python benchmarks/isolation/baseline_arms.py --name sasrec_tuning_beauty \
        --arm "CE, dropout 0.5=/work/runs/sas-s2" --test "CE, dropout 0.5=/work/runs/sas-s2-test" ...

Writes benchmarks/results/<name>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("recall_at_5", "ndcg_at_5", "recall_at_10", "ndcg_at_10")


def _info(run: str) -> dict[str, Any]:
    manifest = Path(run).expanduser() / "baseline" / "_manifest.json"
    if not manifest.exists():
        raise SystemExit(f"{manifest}: not a finished baseline run")
    return json.loads(manifest.read_text())["info"]


def _shown(spec: str) -> str:
    """LABEL=RUN with the run as ``<root>/<run name>``: no machine paths in a results file."""
    label, _, run = spec.rpartition("=")
    return f"{label}=<root>/{Path(run).name}"


def _pairs(specs: list[str]) -> dict[str, str]:
    out = {}
    for s in specs:
        label, _, run = s.rpartition("=")
        if not run:
            raise SystemExit(f"expected LABEL=RUN_DIR, got {s!r}")
        out[label] = run
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--arm", action="append", required=True, help="LABEL=RUN (validation run)")
    ap.add_argument("--test", action="append", default=[], help="LABEL=RUN (the same arm scored on test)")
    ap.add_argument("--protocol", default="")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from grlm_ray.bench.common import describe, portable

    tests = _pairs(args.test)
    rows = []
    for label, run in _pairs(args.arm).items():
        info = _info(run)
        curve = info.get("validation_curve") or []
        best = next((p for p in curve if p["epoch"] == info.get("best_epoch")), None)
        row = {"arm": label, "config": info["protocol"]["config"], "epochs_run": info.get("epochs_run"),
               "best_epoch": info.get("best_epoch"), "train_seconds": info["train_seconds"],
               "valid": {k: best[k] for k in KEYS} if best else None, "valid_users": info["metrics"]["users"],
               "curve": curve}
        if label in tests:
            t = _info(tests[label])
            if t.get("losses") != info.get("losses"):
                raise SystemExit(f"{label}: the test run did not reuse the validated model (other losses)")
            row["test"] = {k: t["metrics"][k] for k in KEYS}
            row["test_users"] = t["metrics"]["users"]
            row["test_popularity"] = {k: t["popularity"][k] for k in KEYS}
        rows.append(row)
    out = {"name": args.name, "protocol": args.protocol, "note": args.note, "rows": rows, "machine": describe(),
           "command": "python benchmarks/isolation/baseline_arms.py --name " + args.name + " " + " ".join(
               [f"--arm {_shown(a)!r}" for a in args.arm] + [f"--test {_shown(t)!r}" for t in args.test])}
    path = ROOT / "benchmarks" / "results" / f"{args.name}.json"
    path.write_text(json.dumps(portable(out), indent=1))
    fmt = lambda d, k: "-" if not d else f"{d[k]:.4f}"  # noqa: E731
    print(f"{'arm':44s} {'best ep':>7s} {'train s':>8s}  valid R@10 / N@10   test R@10 / N@10")
    for r in rows:
        print(f"{r['arm'][:44]:44s} {str(r['best_epoch']):>7s} {r['train_seconds']:8.0f}  "
              f"{fmt(r['valid'], 'recall_at_10')} / {fmt(r['valid'], 'ndcg_at_10')}    "
              f"{fmt(r.get('test'), 'recall_at_10')} / {fmt(r.get('test'), 'ndcg_at_10')}")
    print(f"-> {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
