"""Is the cold-start placement a Term-ID win, or a text trick any recommender can use? SASRec-CE with the same text
placement of the new items.

The cold-start bench's GRLM rows reach new items only through the text placement (the new items nearest the user's
last item placed in the model's list, optionally above a content fill); GRLM's own beams reach none. The placement
needs only a ranked list, so it can go on SASRec-CE's list just as well. This applies the bench's chosen rules
(chosen on GRLM's validation lists: not tuned for SASRec) to the SASRec-CE test lists of the same run and users
(`grlm bench cold-start` with `sasrec_ce` in `bench.baselines`), with the same content fill where the bench chose one,
and scores them beside the bench's rows (`split_metrics`). Reads the bench's runs and result file; trains nothing.

    python benchmarks/isolation/sasrec_placement.py configs/bench/beauty_cold_start.yaml \
        --name cold_start_beauty_sasrec_placement --set run.root=runs data.base_dir=../shared/data/amazon2014

Writes benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--name", required=True)
    ap.add_argument("--result", help="the bench's result file (default: benchmarks/results/cold_start_<dataset>.json)")
    ap.add_argument("--set", nargs="*", default=[])
    args = ap.parse_args(argv)

    from grlm_ray.bench.cold_start import held_out_rows, last_items, split_metrics
    from grlm_ray.bench.common import write_result
    from grlm_ray.core.config import load_config
    from grlm_ray.core.errors import GrlmError
    from grlm_ray.core.run import Run
    from grlm_ray.core.schemas import PREDICTIONS
    from grlm_ray.lib.embeddings import catalog_embeddings
    from grlm_ray.lib.eig import TextNeighbours, fill_content, gate, place_added, placement_depth

    t0 = time.time()
    cfg = load_config(args.config, args.set)
    dataset = "_".join(cfg.data.domains)
    result = json.loads(Path(args.result or RESULTS / f"cold_start_{dataset}.json").read_text())
    base = Run.of(cfg)
    absent = base.named(result["runs"]["absent"])
    if not absent.exists("baseline", "predictions.parquet"):
        raise GrlmError(f"{absent.name}/baseline: no SASRec-CE predictions (run the bench with sasrec_ce in "
                        "bench.baselines)")
    p = absent.read_table("baseline", "predictions.parquet", PREDICTIONS)
    users = p.column("user_id").to_pylist()
    rows = list(zip(p.column("target_item_id").to_pylist(), p.column("ranked_item_ids").to_pylist()))
    held = set(base.read_table("prepare", "holdout_items.parquet").column("item_id").to_pylist())
    rows_new, _ = held_out_rows(base)
    ids, emb = catalog_embeddings(cfg, rows_new)
    new_ids = {r["item_id"] for r in rows_new}
    placer = TextNeighbours(ids, emb, sorted(new_ids))
    near = TextNeighbours(ids, emb, ids)
    seen_near = TextNeighbours(ids, emb, [i for i in ids if i not in new_ids])
    last = last_items(cfg, users)
    k = 10

    def placed(lists: list[tuple[str, list[str]]], rule: dict[str, Any], fill: int) -> list[tuple[str, list[str]]]:
        cands = placer.candidates(last, rule["slots"])
        if rule["within"]:
            cands = gate(cands, near.floors(last, rule["within"]))
        return [(t, place_added(r, c, rule["min_cosine"], rule["slots"], rule["position"], placement_depth(k, fill)))
                for (t, r), c in zip(lists, cands)]

    def filled(lists: list[tuple[str, list[str]]], pool: Any, fill: int) -> list[tuple[str, list[str]]]:
        return [(t, fill_content(r, c, fill, k)) for (t, r), c in zip(lists, pool.ranked(last, k))]

    out_rows = {"SASRec-CE (new items absent)": rows}
    rule = result["added_neighbours_tuning"]["last"]["chosen"]
    if rule:
        out_rows["SASRec-CE + new items, text neighbours of the last item"] = placed(rows, rule, 0)
    fill_tuning = result.get("content_fill_tuning") or {}
    f = fill_tuning.get("chosen") or 0
    if f:
        out_rows[f"SASRec-CE, new items absent + {f} text neighbours"] = filled(rows, seen_near, f)
        frule = fill_tuning["neighbours"]["chosen"]
        if frule:
            out_rows[f"SASRec-CE + new items, text neighbours of the last item + {f} text neighbours"] = \
                filled(placed(rows, frule, f), near, f)
    table = [{"model": name, **split_metrics(r, held, k)} for name, r in out_rows.items()]
    bench = {r["model"]: r for r in result["rows"]}
    for r in table:
        print(f"{r['model'][:80]:80s} new {r['recall_at_10_new']:.4f} seen {r['recall_at_10_seen']:.4f} "
              f"all {r['recall_at_10']:.4f} / {r['ndcg_at_10']:.4f}")
    out = {"config": args.config, "bench_run": result.get("run"), "users": len(users),
           "rules": {"unfilled": rule, "fill": f, "filled": (fill_tuning.get("neighbours") or {}).get("chosen")},
           "rules_chosen_on": "GRLM's validation lists (the bench's choice), not tuned for SASRec",
           "rows": table,
           "bench_rows": {n: bench[n] for n in bench if n.startswith(("GRLM", "content", "SASRec"))},
           "seconds": round(time.time() - t0, 1),
           "command": " ".join(["python benchmarks/isolation/sasrec_placement.py", args.config, "--name", args.name,
                                "--set", *args.set])}
    write_result(args.name, out, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
