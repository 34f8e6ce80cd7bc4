"""Arms scored on the same users, compared user by user: is a gap in R@10 more than noise, and does an arm
recommend by history at all? For evaluations of different models on one seeded user sample (e.g. the equal-token
arms of issue #35 part 3, ``grlm eval CONFIG [arm overrides] eval.split=valid eval.limit_users=N``).

For each arm (LABEL=RUN, a run folder holding ``eval/predictions.parquet``): R@K / N@K recomputed from its
predictions (and checked against its ``eval/metrics.json``), distinct top-1 items and distinct top-K lists, and
the share of users given the arm's most common top-K list (1.0 = one list for everyone: a model that ignores the
history). For each pair of arms: users hit by both, by only the first, by only the second at K, and the exact
two-sided sign test on the users hit by exactly one of them (McNemar's exact test: under "no difference" each
such user is a fair coin). An arm whose run holds its training (``train/_manifest.json``) also reports what it
trained: parameters, vocabulary, precision, steps, seconds and its validation curve (arms of different sizes or
machines are then compared knowingly).

    python benchmarks/isolation/paired_arms.py --name equal_tokens_beauty_paired \
        --arm "pretrained=/work/runs/bench-beauty-smollm2" --arm "random init=/work/runs/bench-beauty-smollm2-reinit"

Refuses arms whose evaluations do not cover the same users with the same targets. Writes
benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections import Counter
from itertools import combinations
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def sign_test_p(only_a: int, only_b: int) -> float:
    """Exact two-sided binomial test of only_a vs only_b successes at p = 1/2 (1.0 when both are 0)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    low = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def load_predictions(run: Path) -> dict[str, tuple[str, list[str]]]:
    import pyarrow.parquet as pq

    path = run / "eval" / "predictions.parquet"
    if not path.exists():
        raise SystemExit(f"{path} is missing: evaluate the run first (grlm eval CONFIG ... eval.limit_users=N)")
    t = pq.read_table(path, columns=["user_id", "target_item_id", "ranked_item_ids"])
    users = t.column("user_id").to_pylist()
    if len(set(users)) != len(users):
        raise SystemExit(f"{path}: a user appears more than once")
    return dict(zip(users, zip(t.column("target_item_id").to_pylist(), t.column("ranked_item_ids").to_pylist())))


def arm_summary(preds: dict[str, tuple[str, list[str]]], k: int) -> tuple[dict[str, Any], dict[str, bool]]:
    from grlm_ray.lib.metrics import ndcg_at_k, recall_at_k

    n = len(preds)
    hits = {u: bool(recall_at_k(r, t, k)) for u, (t, r) in preds.items()}
    lists = Counter(tuple(r[:k]) for _, r in preds.values())
    return {
        "users": n,
        f"recall_at_{k}": round(sum(hits.values()) / n, 6),
        f"ndcg_at_{k}": round(sum(ndcg_at_k(r, t, k) for t, r in preds.values()) / n, 6),
        "hits": sum(hits.values()),
        "distinct_top1": len({r[0] for _, r in preds.values() if r}),
        f"distinct_top{k}_lists": len(lists),
        f"most_common_top{k}_share": round(lists.most_common(1)[0][1] / n, 6),
    }, hits


def read_arms(specs: list[str]) -> dict[str, tuple[Path, dict[str, tuple[str, list[str]]]]]:
    """LABEL=RUN specs -> {label: (run, predictions)}; refuses arms evaluated on other users or targets."""
    out: dict[str, tuple[Path, dict[str, tuple[str, list[str]]]]] = {}
    keys: list | None = None
    for spec in specs:
        label, _, source = spec.rpartition("=")
        if not label:
            raise SystemExit(f"--arm needs LABEL=RUN, got {spec!r}")
        run = Path(source).expanduser()
        preds = load_predictions(run)
        these = sorted((u, t) for u, (t, _) in preds.items())
        if keys is None:
            keys, first = these, label
        elif these != keys:
            raise SystemExit(f"arm {label!r} ({run}) was evaluated on other users or targets than arm {first!r}: "
                             f"{len(these)} vs {len(keys)} users; evaluate both with the same eval.split / "
                             "eval.limit_users / eval.seed")
        out[label] = (run, preds)
    return out


def command_line(script: str, specs: list[str], name: str, extra: str = "") -> str:
    """The command as recorded in a result file: run folders under ``<root>``."""
    arms = " ".join(f"--arm '{s.rpartition('=')[0]}=<root>/{Path(s.rpartition('=')[2]).name}'" for s in specs)
    return f"python benchmarks/isolation/{script} {arms} --name {name}{extra}"


def write_result(name: str, out: dict[str, Any], folder: Path | None = None) -> Path:
    """<folder, default benchmarks/results>/<name>.json, written atomically."""
    folder = folder or RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)
    return path


def training_facts(run: Path) -> dict[str, Any] | None:
    """What the arm's model is and how it trained, from its train stage's manifest (None: not trained here)."""
    path = run / "train" / "_manifest.json"
    if not path.exists():
        return None
    info = json.loads(path.read_text()).get("info") or {}
    backbone = info.get("backbone") or {}
    curve = run / "train" / "validation_curve.json"
    return {"parameters": backbone.get("parameters"), "vocab_size": backbone.get("vocab_size"),
            "precision": info.get("precision"), "steps": info.get("steps"),
            "train_seconds": info.get("train_seconds"),
            "validation_curve": [{k: p.get(k) for k in ("epoch", "recall_at_10", "ndcg_at_10")}
                                 for p in json.loads(curve.read_text())] if curve.exists() else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", action="append", required=True, metavar="LABEL=RUN")
    ap.add_argument("--name", required=True)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--protocol", default="")
    args = ap.parse_args(argv)
    if len(args.arm) < 2:
        raise SystemExit("--arm: give at least two arms to compare")
    sys.path.insert(0, str(ROOT))
    from grlm_ray.bench.common import describe, portable

    arms: dict[str, dict[str, Any]] = {}
    hits: dict[str, dict[str, bool]] = {}
    read = read_arms(args.arm)
    for label, (run, preds) in read.items():
        summary, hits[label] = arm_summary(preds, args.k)
        recorded = run / "eval" / "metrics.json"
        if recorded.exists():  # the stage's own number, from the same predictions
            m = json.loads(recorded.read_text())
            want = m.get("model", {}).get("overall", {}).get(f"recall_at_{args.k}")
            if want is not None and abs(want - summary[f"recall_at_{args.k}"]) > 1e-6:
                raise SystemExit(f"{recorded}: recall_at_{args.k} {want} but its predictions give "
                                 f"{summary[f'recall_at_{args.k}']}")
        arms[label] = {"run": run.name, **summary}
        trained = training_facts(run)
        if trained is not None:
            arms[label]["training"] = trained

    pairs = []
    for a, b in combinations(arms, 2):
        both = sum(hits[a][u] and hits[b][u] for u in hits[a])
        only_a = sum(hits[a][u] and not hits[b][u] for u in hits[a])
        only_b = sum(hits[b][u] and not hits[a][u] for u in hits[a])
        pairs.append({"a": a, "b": b, "both": both, "only_a": only_a, "only_b": only_b,
                      "sign_test_p": round(sign_test_p(only_a, only_b), 6)})

    users = sorted(next(iter(read.values()))[1])
    out = {
        "k": args.k, "users": len(users),
        "user_ids_sha1": hashlib.sha1("\n".join(users).encode()).hexdigest(),
        "arms": arms, "pairs": pairs, "protocol": args.protocol,
        "machine": describe(),
        "command": command_line("paired_arms.py", args.arm, args.name, f" --k {args.k}" if args.k != 10 else ""),
    }
    path = write_result(args.name, portable(out))
    k = args.k
    print(f"{'arm':<28} {'R@' + str(k):>8} {'N@' + str(k):>8} {'hits':>6} {'top1':>6} {'lists':>6} {'common':>7} "
          f"{'params M':>8}")
    for label, s in arms.items():
        n = (s.get("training") or {}).get("parameters")
        print(f"{label:<28} {s[f'recall_at_{k}']:>8.4f} {s[f'ndcg_at_{k}']:>8.4f} {s['hits']:>6} "
              f"{s['distinct_top1']:>6} {s[f'distinct_top{k}_lists']:>6} {s[f'most_common_top{k}_share']:>7.3f} "
              + (f"{n / 1e6:>8.2f}" if isinstance(n, int) else f"{'-':>8}"))
    for p in pairs:
        print(f"{p['a']} vs {p['b']}: both {p['both']}, only {p['a']} {p['only_a']}, only {p['b']} {p['only_b']}, "
              f"exact sign test p = {p['sign_test_p']:.4f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
