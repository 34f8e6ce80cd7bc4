"""Would the model's own confidence tell where to show new items? Validation only, on a cold-start config's runs
(the bench's: its validation beams with their log-probabilities, ``validation_beams``, decoded once and kept beside
the run; nothing is trained, nothing on the test split is read).

A new item placed in a list's last places pushes out the model's least likely items; that costs seen-item hits
only where those items were right. If those hits sat with the users the model is sure about (a high top-beam
log-probability), showing new items only to the others (``top log-prob < its q-quantile``) would buy the same
new-item recall for less. Measured on every validation user:

- **where the cost falls**: the validation R@10 and the hits in places 9-10 (an unfilled bottom placement's) and
  5-7 (one above a 3-place fill) by quintile of the top beam's log-probability;
- **what the gate buys**: for each confidence quantile q (1.0: no gate), rank gate, slots and cosine floor, the
  seen R@10 cost against the lists without new items (with the fill: the same filled lists) and the simulated
  arrivals found (the bench's ``simulate_arrivals``: pools of seen late items playing the new ones, taken out of
  the histories as the holdout takes the real ones, counted only for users the gate lets through); per fill, the best rule within ``bench.new_item_cost`` by simulated arrivals,
  gated and not.

    python benchmarks/isolation/confidence_gate.py configs/bench/beauty_cold_start.yaml --name cold_start_beauty_confidence \\
        --set run.root=runs data.base_dir=../shared/data/amazon2014

Writes benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
QUANTILES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
FLOORS = (0.5, 0.6, 0.65, 0.7, 0.75, 0.8)
WITHINS = (0, 10, 20)


def quintiles(top: np.ndarray, pos: np.ndarray) -> list[dict[str, Any]]:
    """Validation users by quintile of their top beam's log-probability (low first): R@10 and the hits in the
    places a bottom placement takes (9-10 unfilled, 5-7 above a 3-place fill)."""
    edges = np.quantile(top, [0.2, 0.4, 0.6, 0.8])
    b = np.digitize(top, edges)
    out = []
    for k in range(5):
        m = b == k
        p = pos[m]
        out.append({"quintile": k + 1, "users": int(m.sum()), "top_log_prob_max": float(top[m].max()),
                    "recall_at_10": round(float(np.mean(p > 0)), 6),
                    "hits_9_10": round(float(np.mean(p >= 9)), 6),
                    "hits_5_7": round(float(np.mean((p >= 5) & (p <= 7))), 6)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--name", required=True)
    ap.add_argument("--fills", default="0,3", help="content fills to measure the gate on (comma-separated)")
    ap.add_argument("--set", nargs="*", default=[])
    args = ap.parse_args(argv)

    from grlm_ray.bench.cold_start import (ARRIVAL_POOLS, arrival_pools, held_out_rows, plan, validation_beams,
                                           validation_lists)
    from grlm_ray.bench.common import write_result
    from grlm_ray.core.config import load_config
    from grlm_ray.core.errors import GrlmError
    from grlm_ray.core.run import Run
    from grlm_ray.core.schemas import SEQUENCES, TARGETS
    from grlm_ray.lib.embeddings import catalog_embeddings
    from grlm_ray.lib.eig import TextNeighbours, fill_content, gate, place_added, placement_depth
    from grlm_ray.lib.protocol import history_items, target_rows

    t0 = time.time()
    cfg = load_config(args.config, args.set)
    fills = [int(x) for x in args.fills.split(",")]
    runs = plan(cfg)
    if "new_valid" not in runs or "new_search" not in runs:
        raise GrlmError(f"{args.config}: the confidence gate reads the bench's validation runs: it needs "
                        "bench.new_item_levers with added_search and added_neighbours (run the bench first)")
    run = Run.of(cfg)
    beams = validation_beams(runs["new_search"], cfg.bench.sample_users, 2)
    conf = {u: (m[0][1] if m else -np.inf) for u, m in zip(beams["users"], beams["main"])}
    users, rows, last = validation_lists(runs["new_valid"])
    missing = [u for u in users if u not in conf]
    if missing:
        raise GrlmError(f"{len(missing)} validation users of {runs['new_valid'].run.name} have no validation beams "
                        f"(e.g. {missing[0]}): bench.sample_users is below the validation users")
    top = np.array([conf[u] for u in users])
    want = [w for w, _ in rows]
    pos = np.array([(r[:10].index(w) + 1) if w in r[:10] else 0 for w, r in rows])
    held = set(run.read_table("prepare", "holdout_items.parquet").column("item_id").to_pylist())
    rows_new, _ = held_out_rows(Run.of(runs["new"]))
    ids, emb = catalog_embeddings(runs["new"], rows_new)
    slots_grid = list(cfg.bench.neighbour_slots)
    placer = TextNeighbours(ids, emb, [r["item_id"] for r in rows_new])
    near = TextNeighbours(ids, emb, ids)
    seen_near = TextNeighbours(ids, emb, [i for i in ids if i not in held])
    cands = placer.candidates(last, max(slots_grid))
    floors = near.floors_at(last, [w for w in WITHINS if w])
    # simulated arrivals, per user: how many pools' placements (each rule) found the user's target
    seqs = run.read_table("prepare", "sequences.parquet", SEQUENCES)
    t = target_rows(run.read_table("prepare", "targets.parquet", TARGETS), "valid", None, cfg.eval.seed)
    hist_of = dict(zip(t.column("user_id").to_pylist(), history_items(seqs, t)))
    hists = [hist_of[u] for u in users]
    h = cfg.data.holdout
    pools = arrival_pools(run, seqs, len(held), h.candidates, h.seed, ARRIVAL_POOLS)
    sim_users = 0
    sim = {(w, s, m): np.zeros(len(users)) for w in WITHINS for s in slots_grid for m in FLOORS}
    for pool in pools:
        members = set(pool)
        js = [j for j, x in enumerate(want) if x in members]
        sim_users += len(js)
        # as the bench simulates: the pool's members taken out of the histories (the anchor: the last item not in it)
        anchors = [next((x for x in reversed(hists[j]) if x not in members), None) for j in js]
        pc = TextNeighbours(ids, emb, pool).candidates(anchors, max(slots_grid))
        pf = near.floors_at(anchors, [w for w in WITHINS if w])
        for w in WITHINS:
            g = gate(pc, pf[w]) if w else pc
            for s in slots_grid:
                for m in FLOORS:
                    for j, c in zip(js, g):
                        if want[j] in place_added([], c, m, s):
                            sim[(w, s, m)][j] += 1
    by_fill = {}
    for fill in fills:
        content = near.ranked(last, 10) if fill else None
        if fill:
            ref = np.array([w in fill_content([x for x in r if x not in held], c, fill, 10)[:10]
                            for (w, r), c in zip(rows, seen_near.ranked(last, 10))])
        else:
            ref = np.array([w in r[:10] for w, r in rows])
        points = []
        for q in QUANTILES:
            mask = top < np.quantile(top, q) if q < 1 else np.ones(len(top), dtype=bool)
            for w in WITHINS:
                g = gate(cands, floors[w]) if w else cands
                for s in slots_grid:
                    for m in FLOORS:
                        hit = 0
                        for j, ((t, r), c) in enumerate(zip(rows, g)):
                            lst = place_added(r, c, m, s, "bottom", placement_depth(10, fill)) if mask[j] else r
                            if fill:
                                lst = fill_content(lst, content[j], fill, 10)
                            hit += t in lst[:10]
                        points.append({"quantile": q, "within": w, "slots": s, "min_cosine": m,
                                       "cost": round(1 - hit / len(rows) / ref.mean(), 6),
                                       "simulated_new_recall": round(float((sim[(w, s, m)] * mask).sum()) / sim_users, 6)})
        ok = [p for p in points if p["cost"] <= cfg.bench.new_item_cost]
        best = {("gated" if g_ else "ungated"): max((p for p in ok if (p["quantile"] < 1) == g_),
                                                   key=lambda p: p["simulated_new_recall"], default=None)
                for g_ in (False, True)}
        by_fill[str(fill)] = {"reference_recall_at_10": round(float(ref.mean()), 6), "best_within_cost": best,
                              "points": points}
    result = {"run": cfg.run.name, "config": args.config, "overrides": args.set, "split": "valid",
              "users": len(users), "cost": cfg.bench.new_item_cost,
              "simulated_arrivals": {"pools": ARRIVAL_POOLS, "pool_items": len(held), "target_users": sim_users},
              "beams_reused": beams["reused"], "by_confidence_quintile": quintiles(top, pos), "by_fill": by_fill,
              "seconds": round(time.time() - t0, 1),
              "command": " ".join(["python benchmarks/isolation/confidence_gate.py", args.config, "--name", args.name,
                                   "--fills", args.fills, "--set", *args.set])}
    path = write_result(args.name, result, RESULTS)
    print(f"validation users {len(users)} by the top beam's log-probability (low quintile first):")
    for q in result["by_confidence_quintile"]:
        print(f"  q{q['quintile']} R@10 {q['recall_at_10']:.4f}  hits at 9-10 {q['hits_9_10']:.4f}  "
              f"at 5-7 {q['hits_5_7']:.4f}")
    for fill, v in by_fill.items():
        for kind, p in v["best_within_cost"].items():
            print(f"fill {fill}, best {kind} rule within {cfg.bench.new_item_cost:.0%}: " + (
                "none" if p is None else f"q {p['quantile']} within {p['within']} {p['slots']} slots cos >= "
                f"{p['min_cosine']}: cost {p['cost']:.4f}, simulated arrivals {p['simulated_new_recall']:.4f}"))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
