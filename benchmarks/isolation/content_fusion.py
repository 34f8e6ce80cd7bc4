"""Does GRLM add anything to the content baseline? On a finished cold-start run (``grlm bench cold-start CONFIG``:
its GRLM lists with the new items in the catalog, on 2,000 validation users and on every test user), each user's
list = GRLM's first ``m`` items and the content baseline's (the last item's text neighbours, the bench's own
``content_rankings``) filling the rest to 10, in either order (GRLM first, or content first). ``m`` and the order
are chosen on the validation users (Recall@10, then NDCG@10), the test users scored once with the choice; every
``m`` is recorded for both splits. Nothing is trained or decoded: the bench's stored predictions are read.

    python benchmarks/isolation/content_fusion.py configs/bench/toys_cold_start.yaml --name content_fusion_toys \
        --set run.root=runs data.base_dir=../shared/data/amazon2014 'bench.baselines=[]'

On the quality table's split instead (no held-out items): ``--valid-run`` and ``--test-run`` name two runs under the
config's root whose eval stages scored the same model on validation users and on the test users
(``grlm eval CONFIG eval.split=valid eval.limit_users=2000 run.name=...``); the config gives the embeddings and
histories (its prepare and embed stages). ``--stage baseline`` fuses SASRec's lists (the baseline stage's) instead
of GRLM's: the same neighbours for the like-for-like comparison (``grlm_items`` then counts SASRec's items).

    python benchmarks/isolation/content_fusion.py configs/bench/beauty_quality.yaml --name content_fusion_beauty_ens3 \
        --valid-run ens-s0-valid3 --test-run ens-s0 --set run.root=runs train.epochs=10 ...

Writes benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def fuse(grlm: list[str], content: list[str], m: int, order: str, k: int = 10) -> list[str]:
    """GRLM's first ``m`` items and the content list's first items not among them, ``k`` in all; ``order``
    'grlm' puts GRLM's part first, 'content' the content part first."""
    head = list(grlm[:m])
    fill = [i for i in content if i not in head][:k - len(head)]
    return head + fill if order == "grlm" else fill + head


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--name", required=True)
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--valid-run", help="the quality split: the run whose eval scored validation users")
    ap.add_argument("--test-run", help="the quality split: the run whose eval scored the test users")
    ap.add_argument("--stage", default="eval", choices=("eval", "baseline"),
                    help="the quality split: whose lists to fuse: GRLM's (eval) or SASRec's (baseline)")
    args = ap.parse_args(argv)

    from grlm_ray.bench.cold_start import (
        content_rankings,
        held_out_rows,
        last_items,
        plan,
        split_metrics,
    )
    from grlm_ray.bench.common import write_result
    from grlm_ray.core.config import load_config
    from grlm_ray.core.run import Run
    from grlm_ray.core.schemas import PREDICTIONS
    from grlm_ray.lib.embeddings import catalog_embeddings

    t0 = time.time()
    cfg = load_config(args.config, args.set)
    if bool(args.valid_run) != bool(args.test_run):
        raise SystemExit("--valid-run and --test-run go together")
    if args.valid_run:  # the quality split: two runs of one model, no held-out items
        held: set[str] = set()
        ids, emb = catalog_embeddings(cfg, [])
        roles = {"valid": cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": args.valid_run})}),
                 "test": cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": args.test_run})})}
    else:
        runs = plan(cfg)
        if "new_valid" not in runs:
            raise SystemExit("the cold-start config has no validation run: add added_neighbours to "
                             "bench.new_item_levers")
        held = set(Run.of(cfg).read_table("prepare", "holdout_items.parquet").column("item_id").to_pylist())
        rows_new, _ = held_out_rows(Run.of(runs["new"]))
        ids, emb = catalog_embeddings(runs["new"], rows_new)
        roles = {"valid": runs["new_valid"], "test": runs["new"]}
    data = {}
    for split, rcfg in roles.items():
        p = Run.of(rcfg).read_table(args.stage if args.valid_run else "eval", "predictions.parquet",
                                    None if args.stage == "baseline" else PREDICTIONS)
        if set(p.column("split").to_pylist()) != {split}:
            raise SystemExit(f"{rcfg.run.name}'s eval scored {set(p.column('split').to_pylist())}, not {split}")
        users = p.column("user_id").to_pylist()
        grlm = list(zip(p.column("target_item_id").to_pylist(), p.column("ranked_item_ids").to_pylist()))
        ev = rcfg.model_copy(update={"eval": rcfg.eval.model_copy(update={
            "split": split, "limit_users": len(users) if split == "valid" else None})})
        content = content_rankings(ids, emb, last_items(ev, users), 10)
        data[split] = (grlm, content)
    curves: dict[str, list[dict]] = {}
    for split, (grlm, content) in data.items():
        curves[split] = [{"order": order, "grlm_items": m,
                          **split_metrics([(t, fuse(g, c, m, order)) for (t, g), c in zip(grlm, content)], held)}
                         for order in ("grlm", "content") for m in range(11)]
    chosen = max(curves["valid"], key=lambda p: (p["recall_at_10"], p["ndcg_at_10"]))
    test = next(p for p in curves["test"] if (p["order"], p["grlm_items"]) == (chosen["order"], chosen["grlm_items"]))
    ends = {name: next(p for p in curves["test"] if (p["order"], p["grlm_items"]) == key)
            for name, key in ((f"{'SASRec' if args.stage == 'baseline' else 'GRLM'} alone", ("grlm", 10)),
                              ("content alone", ("grlm", 0)))}
    result = {"run": cfg.run.name, "config": args.config, "overrides": args.set, "lists": args.stage,
              "runs": {"valid": roles["valid"].run.name, "test": roles["test"].run.name},
              "users": {"valid": len(data["valid"][0]), "test": len(data["test"][0])},
              "chosen_on_validation": {"order": chosen["order"], "grlm_items": chosen["grlm_items"],
                                       "valid": chosen},
              "test": test, "test_ends": ends, "curves": curves, "seconds": round(time.time() - t0, 1),
              "command": "python benchmarks/isolation/content_fusion.py " + " ".join(
                  [args.config, "--name", args.name,
                   *(["--valid-run", args.valid_run, "--test-run", args.test_run, "--stage", args.stage]
                     if args.valid_run else []),
                   "--set", *args.set])}
    path = write_result(args.name, result, REPO / "benchmarks" / "results")
    print(f"chosen on validation: {chosen['grlm_items']} of the model's items, {chosen['order']} first "
          f"(valid R@10 {chosen['recall_at_10']:.4f} N@10 {chosen['ndcg_at_10']:.4f})")
    for name, p in [("fusion", test), *ends.items()]:
        new = "-" if p["recall_at_10_new"] is None else f"{p['recall_at_10_new']:.4f}"
        print(f"test {name:14s} R@10 {p['recall_at_10']:.4f} N@10 {p['ndcg_at_10']:.4f} | new {new}"
              f" | seen {p['recall_at_10_seen']:.4f} / {p['ndcg_at_10_seen']:.4f}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
