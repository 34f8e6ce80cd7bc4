"""The baseline a user would try first, on the quality table's own users: each user's next item = the items whose
text embedding is nearest their last history item (cosine over the run's embed stage: the same embeddings GRLM's
CTG and the cold-start bench use; the last item itself excluded; no history masking, as for every other model).
Runs the config's prepare and embed stages (reused when complete), then scores every user of the split with the
project's metric code (``lib/metrics.py`` through the cold-start bench's ``split_metrics``) and the protocol's target rows and last items (``lib/protocol.py``).

    python benchmarks/isolation/content_baseline.py configs/bench/toys_quality.yaml --name content_baseline_toys \
        --set run.root=runs data.base_dir=../shared/data/amazon2014

Writes benchmarks/results/<name>.json (with the machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--name", required=True, help="result file name (benchmarks/results/<name>.json)")
    ap.add_argument("--split", default="test", choices=("valid", "test"))
    ap.add_argument("--set", nargs="*", default=[], help="config overrides (key=value)")
    args = ap.parse_args(argv)

    from grlm_ray.bench.cold_start import content_rankings, split_metrics
    from grlm_ray.bench.common import write_result
    from grlm_ray.core.config import load_config
    from grlm_ray.core.run import Run
    from grlm_ray.core.schemas import SEQUENCES, TARGETS
    from grlm_ray.flows.pipeline import run_pipeline, upstream
    from grlm_ray.lib.embeddings import catalog_embeddings
    from grlm_ray.lib.protocol import last_history_items, target_rows

    cfg = load_config(args.config, args.set)
    t0 = time.time()
    run_pipeline(cfg, stages=upstream("embed", cfg))
    run = Run.of(cfg)
    t = target_rows(run.read_table("prepare", "targets.parquet", TARGETS), args.split, None, cfg.eval.seed)
    last = last_history_items(run.read_table("prepare", "sequences.parquet", SEQUENCES), t)
    targets = t.column("target_item_id").to_pylist()
    ids, emb = catalog_embeddings(cfg, [])
    known = set(ids)
    ok = [n for n, a in enumerate(last) if a is not None and a in known]
    if len(ok) < len(last):  # counted, never dropped: a user without a last embedded item scores 0
        print(f"{len(last) - len(ok)} of {len(last)} users have no embedded last item: they score 0", file=sys.stderr)
    t1 = time.time()
    ranked = [[] for _ in last]
    for n, r in zip(ok, content_rankings(ids, emb, [last[n] for n in ok], 10)):
        ranked[n] = r
    score_s = time.time() - t1
    users = len(targets)
    rows = list(zip(targets, ranked))
    metrics = {f"{m}_at_{k}": split_metrics(rows, set(), k)[f"{m}_at_{k}"] for k in (5, 10) for m in ("recall", "ndcg")}
    coverage = len({i for r in ranked for i in r}) / len(ids)
    result = {"benchmark": "content baseline: the last history item's text neighbours (cosine), every user of the split",
              "config": args.config, "overrides": args.set, "run": cfg.run.name, "split": args.split,
              "users": users, "users_without_last_item": len(last) - len(ok), "items": len(ids),
              "embedding_model": cfg.embed.model, "history_masked": False, "metrics": metrics,
              "coverage_at_10": round(coverage, 4), "score_seconds": round(score_s, 1),
              "seconds": round(time.time() - t0, 1),
              "command": "python benchmarks/isolation/content_baseline.py " + " ".join(
                  [args.config, "--name", args.name, "--split", args.split, "--set", *args.set]),
              }
    path = write_result(args.name, result, REPO / "benchmarks" / "results")
    print(f"{cfg.run.name} {args.split}: {users} users, R@5 {metrics['recall_at_5']:.4f} N@5 {metrics['ndcg_at_5']:.4f} "
          f"R@10 {metrics['recall_at_10']:.4f} N@10 {metrics['ndcg_at_10']:.4f} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
