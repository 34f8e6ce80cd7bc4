"""Where a gap between arms is, by the test target: does one arm lose its hits on targets whose Term ID has a
rare term (one used by at most N items of the catalog: to a model trained from scratch such a term is close to
the item's own id), or everywhere? For the compression comparison's runs (issue #33): the raw vocabulary's rare
terms are what compression merges first.

Every arm (LABEL=RUN, a run folder with ``eval/predictions.parquet``) must have been evaluated on the same users
with the same targets (refused otherwise). The target's group comes from the reference run (``--terms RUN``): its
``sft/terms.parquet`` (the TIDs that run trained on) and its ``prepare/sequences.parquet`` (each history without
its last two items — the validation and test targets — counts as training interactions for the target's
popularity band). Per group: users, hits and R@K of each arm, and each arm's hits lost against the first arm.

    python benchmarks/isolation/target_groups.py --name compression_beauty_target_groups \
        --terms <root>/compress-beauty-raw --arm raw=<root>/compress-beauty-raw \
        --arm "K=1100=<root>/compress-beauty-k1100-random"

Writes benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BANDS = ((5, "<=5"), (15, "6-15"), (None, ">15"))  # training interactions of the target item


def band(n: int) -> str:
    return next(label for top, label in BANDS if top is None or n <= top)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--terms", required=True, metavar="RUN", help="the run whose TIDs define the rare terms")
    ap.add_argument("--arm", action="append", required=True, metavar="LABEL=RUN")
    ap.add_argument("--rare", type=int, default=1, help="a term used by at most this many items is rare")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--name", required=True)
    args = ap.parse_args(argv)
    if len(args.arm) < 2:
        raise SystemExit("--arm: give at least two arms to compare")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    import pyarrow.parquet as pq

    from grlm_ray.bench.common import describe, portable
    import paired_arms

    ref = Path(args.terms).expanduser()
    for need in ("sft/terms.parquet", "prepare/sequences.parquet"):
        if not (ref / need).exists():
            raise SystemExit(f"{ref / need} is missing: --terms must be a run folder that ran prepare and sft")
    t = pq.read_table(ref / "sft" / "terms.parquet", columns=["item_id", "terms"]).to_pydict()
    tids = dict(zip(t["item_id"], t["terms"]))
    used_by = Counter(x for tid in tids.values() for x in set(tid))
    rare_items = {i for i, tid in tids.items() if any(used_by[x] <= args.rare for x in tid)}
    seq = pq.read_table(ref / "prepare" / "sequences.parquet", columns=["item_ids"]).column("item_ids").to_pylist()
    pop = Counter(i for s in seq for i in s[:-2])

    arms = {label: preds for label, (_, preds) in paired_arms.read_arms(args.arm).items()}
    keys = sorted((u, tg) for u, (tg, _) in next(iter(arms.values())).items())
    missing = {tg for _, tg in keys if tg not in tids}
    if missing:
        raise SystemExit(f"{ref}/sft/terms.parquet has no TID for {len(missing)} test targets "
                         f"(e.g. {sorted(missing)[0]!r}): --terms must be the arms' catalog")

    groups: dict[str, list[str]] = defaultdict(list)
    for u, tg in keys:
        kind = f"rare term (<= {args.rare} items)" if tg in rare_items else "no rare term"
        for g in (f"{kind} / all", f"{kind} / {band(pop[tg])}", "all"):
            groups[g].append(u)
    k = args.k
    labels = list(arms)
    rows: list[dict[str, Any]] = []
    for g in sorted(groups, key=lambda g: (g == "all", g)):
        us = groups[g]
        hits = {a: sum(arms[a][u][0] in arms[a][u][1][:k] for u in us) for a in labels}
        rows.append({"group": g, "users": len(us),
                     **{f"{a} hits": hits[a] for a in labels},
                     **{f"{a} R@{k}": round(hits[a] / len(us), 6) for a in labels},
                     **{f"{a} hits lost vs {labels[0]}": hits[labels[0]] - hits[a] for a in labels[1:]}})
    out = {"k": k, "rare": args.rare, "users": len(keys), "rows": rows,
           "catalog": {"items": len(tids), "terms": len(used_by),
                       "rare_terms": sum(1 for c in used_by.values() if c <= args.rare),
                       "items_with_a_rare_term": len(rare_items)},
           "machine": describe(),
           "command": paired_arms.command_line(
               "target_groups.py", args.arm, args.name,
               f" --terms <root>/{ref.name}" + (f" --rare {args.rare}" if args.rare != 1 else ""))}
    path = paired_arms.write_result(args.name, portable(out), RESULTS)
    c = out["catalog"]
    print(f"{c['rare_terms']} of {c['terms']} terms are used by <= {args.rare} items; "
          f"{c['items_with_a_rare_term']} of {c['items']} items have one")
    print(f"{'target group':<34} {'users':>6} " + " ".join(f"{a[:14]:>14}" for a in labels))
    for r in rows:
        print(f"{r['group']:<34} {r['users']:>6} " + " ".join(f"{r[f'{a} R@{k}']:>14.4f}" for a in labels))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
