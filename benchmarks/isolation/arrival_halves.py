"""Does the placement rule chosen on real arrivals on validation depend on the test's own new items?

``bench.neighbour_choice=arrivals`` chooses the rule on the validation users whose validation target was a held-out
item (``prepare/holdout_targets.parquet``). Those are other interactions than the test's, but mostly of the same
items (the held-out set is one). This isolation splits the held-out items in two halves (seeded, ``--splits``
times): the rule is chosen on the validation arrivals of one half only (the bench's validation curve for the seen
cost, from its result file; the same choice, ``choose_neighbours``) and scored on the test buyers of the *other*
half's items, beside the content baseline on the same buyers and the rule chosen on every validation arrival.
Model-free: a placement's new-item recall needs no model (``arrival_recalls``); the new items are placed from the
whole held-out set, as the bench and serving do. Unfilled and with the result's chosen content fill.

    python benchmarks/isolation/arrival_halves.py configs/bench/beauty_cold_start.yaml --name cold_start_beauty_halves \
        --set run.root=runs data.base_dir=../shared/data/amazon2014

Writes benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"


RULE = ("position", "slots", "min_cosine", "within")


def _key(p: dict[str, Any]) -> tuple:
    return tuple(p[k] for k in RULE)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--name", required=True)
    ap.add_argument("--result", help="the bench's result file (default: benchmarks/results/cold_start_<dataset>.json)")
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--set", nargs="*", default=[])
    args = ap.parse_args(argv)

    from grlm_ray.bench.cold_start import arrival_recalls, choose_neighbours, held_out_rows, validation_arrivals
    from grlm_ray.bench.common import write_result
    from grlm_ray.core.config import load_config
    from grlm_ray.core.run import Run
    from grlm_ray.core.schemas import SEQUENCES, TARGETS
    from grlm_ray.lib.embeddings import catalog_embeddings
    from grlm_ray.lib.eig import TextNeighbours
    from grlm_ray.lib.protocol import last_history_items, target_rows

    t0 = time.time()
    cfg = load_config(args.config, args.set)
    run = Run.of(cfg)
    dataset = "_".join(cfg.data.domains)
    result = json.loads(Path(args.result or RESULTS / f"cold_start_{dataset}.json").read_text())
    seqs = run.read_table("prepare", "sequences.parquet", SEQUENCES)
    targets = run.read_table("prepare", "targets.parquet", TARGETS)
    rows_new, _ = held_out_rows(run)
    new_items = sorted(r["item_id"] for r in rows_new)
    ids, emb = catalog_embeddings(cfg, rows_new)
    placer, near = TextNeighbours(ids, emb, new_items), TextNeighbours(ids, emb, ids)
    v_anchor, v_want = validation_arrivals(cfg, seqs)
    t = target_rows(targets, "test", cfg.eval.limit_users, cfg.eval.seed)
    held = set(new_items)
    test = [(a, w) for a, w in zip(last_history_items(seqs, t), t.column("target_item_id").to_pylist()) if w in held]
    slots, cost = cfg.bench.neighbour_slots, cfg.bench.new_item_cost
    settings = {0: (result["added_neighbours_tuning"]["last"]["curve"], None)}
    fill = result.get("content_fill_tuning") or {}
    if fill.get("chosen"):
        settings[fill["chosen"]] = (fill["neighbours"]["curve"], fill["neighbours"]["reference"]["recall_at_10"])

    def choose(curve: list[dict[str, Any]], base: float | None, rec: dict[str, Any]) -> dict[str, Any] | None:
        pts = [{**p, "arrival_new_recall": rec["last"].get((p["within"], p["slots"], p["min_cosine"]),
                                                           {"recall": 0.0})["recall"]} for p in curve]
        return choose_neighbours(pts, cost, "arrivals", base)

    def score(rows: list[tuple[str, str]], f: int, rule: dict[str, Any] | None) -> float | None:
        if rule is None or not rows:
            return None
        rec = arrival_recalls([a for a, _ in rows], [w for _, w in rows], placer, near, slots, f)
        return rec["last"][(rule["within"], rule["slots"], rule["min_cosine"])]["recall"]

    def content(rows: list[tuple[str, str]]) -> float:
        ranked = near.ranked([a for a, _ in rows], 10)
        return round(sum(w in r for (_, w), r in zip(rows, ranked)) / len(rows), 6)

    out: dict[str, Any] = {"config": args.config, "bench_run": result.get("run"),
                           "validation_arrivals": len(v_want), "test_new_buyers": len(test), "splits": []}
    every = {f: choose(c, b, arrival_recalls(v_anchor, v_want, placer, near, slots, f))
             for f, (c, b) in settings.items()}
    out["chosen_on_every_arrival"] = {str(f): r and {k: r[k] for k in RULE} for f, r in every.items()}
    for s in range(args.splits):
        perm = np.random.default_rng(s).permutation(len(new_items))
        halves = [{new_items[j] for j in perm[:len(perm) // 2]}, {new_items[j] for j in perm[len(perm) // 2:]}]
        for h in (0, 1):
            mine, other = halves[h], halves[1 - h]
            v = [(a, w) for a, w in zip(v_anchor, v_want) if w in mine]
            te = [(a, w) for a, w in test if w in other]
            row: dict[str, Any] = {"seed": s, "half": h, "validation_arrivals": len(v),
                                   "test_buyers_other_half": len(te), "content_recall_other_half": content(te)}
            for f, (c, b) in settings.items():
                rule = choose(c, b, arrival_recalls([a for a, _ in v], [w for _, w in v], placer, near, slots, f))
                row[f"fill_{f}"] = {"chosen": rule and {k: rule[k] for k in RULE},
                                    "same_as_every_arrival": bool(rule and every[f] and _key(rule) == _key(every[f])),
                                    "recall_other_half": score(te, f, rule),
                                    "recall_other_half_rule_on_every_arrival": score(te, f, every[f])}
            out["splits"].append(row)
            print(json.dumps(row), flush=True)
    for f in settings:
        rs = [r[f"fill_{f}"] for r in out["splits"]]
        got = [r["recall_other_half"] for r in rs if r["recall_other_half"] is not None]
        cont = [r["content_recall_other_half"] for r in out["splits"]]
        out[f"summary_fill_{f}"] = {"same_rule_as_every_arrival": sum(r["same_as_every_arrival"] for r in rs),
                                    "of": len(rs),
                                    "mean_recall_other_half": round(float(np.mean(got)), 6) if got else None,
                                    "mean_content_recall_other_half": round(float(np.mean(cont)), 6),
                                    "halves_at_or_above_content": sum(r[f"fill_{f}"]["recall_other_half"] is not None
                                                                      and r[f"fill_{f}"]["recall_other_half"] >=
                                                                      r["content_recall_other_half"]
                                                                      for r in out["splits"])}
    out["seconds"] = round(time.time() - t0, 1)
    out["command"] = " ".join(["python benchmarks/isolation/arrival_halves.py", args.config, "--name", args.name,
                               "--set", *args.set])
    print(json.dumps({k: v for k, v in out.items() if k.startswith("summary") or k == "chosen_on_every_arrival"}))
    write_result(args.name, out, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
