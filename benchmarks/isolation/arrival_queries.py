"""How far can placing new items by their text neighbours go, and does a query from more of the user's history
find more of them? Model-free, on a cold-start config's runs (its prepare and embed stages; nothing trained or
decoded), for each query — the user's last item (what the bench and the content baseline use), or the decayed sum
of the embeddings of their last ``m`` items (weight ``w ** d`` for the item ``d`` places before the last) — the
share of new-item targets found:

- placed: the target among the ``s`` new items nearest the query (s = 1..5, 10), ungated, and gated within the
  query's 10 nearest catalog items (``eval.added_within=10``); no cosine floor (the bench's rules add one, so
  these are their ceilings);
- content: the target among the query's 10 nearest catalog items, new and seen (the last item itself excluded):
  the content baseline for the last-item query.

On two sets of new items: **simulated arrivals** (the bench's own ``arrival_pools``: pools of seen late items as
large as the held-out set, the validation users whose target is in a pool) and the **real held-out items** on the
test users whose target is one (embedded as the bench embeds them). Nothing is chosen: both are reported.

    python benchmarks/isolation/arrival_queries.py configs/bench/toys_cold_start.yaml --name cold_start_toys_queries \
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
QUERIES = (("last", 1, 1.0), ("m2-w0.3", 2, 0.3), ("m2-w0.5", 2, 0.5), ("m3-w0.3", 3, 0.3), ("m3-w0.5", 3, 0.5),
           ("m5-w0.3", 5, 0.3), ("m3-w1", 3, 1.0))
SLOTS = (1, 2, 3, 4, 5, 10)
PLACE_FLOORS = (0.5, 0.6, 0.7)


def query_vectors(emb: np.ndarray, at: dict[str, int], hists: list[list[str]], m: int, w: float) -> np.ndarray:
    """Unit rows: each history's last ``m`` items' embeddings summed with weight ``w ** d`` (``d`` places before
    the last); a zero row where none of them has an embedding."""
    q = np.zeros((len(hists), emb.shape[1]), dtype=np.float32)
    for j, h in enumerate(hists):
        for d, item in enumerate(reversed(h[-m:])):
            n = at.get(item)
            if n is not None:
                q[j] += (w ** d) * emb[n]
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    return q / np.where(norm == 0, 1, norm)


def found(q: np.ndarray, last: list[int], want: list[int], new_cols: np.ndarray, emb: np.ndarray,
          chunk: int = 1024) -> dict[str, Any]:
    """For queries ``q`` (one per user), each user's last item ``last`` (a catalog row, excluded from every
    ranking; -1: none) and target ``want`` (a catalog row among ``new_cols``): hits of the placed rules (ungated and
    within the query's 10 nearest catalog items, for each of ``SLOTS``) and of the content top 10."""
    placed = {s: 0 for s in SLOTS}
    gated = {s: 0 for s in SLOTS}
    content = 0
    is_new = np.zeros(len(emb), dtype=bool)
    is_new[new_cols] = True
    for a in range(0, len(q), chunk):
        sc = q[a:a + chunk] @ emb.T
        rows = np.arange(len(sc))
        li = np.array(last[a:a + chunk])
        sc[rows[li >= 0], li[li >= 0]] = -np.inf
        tgt = np.array(want[a:a + chunk])
        ts = sc[rows, tgt]
        empty = ~np.any(q[a:a + chunk], axis=1)
        floor10 = np.partition(sc, sc.shape[1] - 10, axis=1)[:, sc.shape[1] - 10]
        content += int(np.sum((ts >= floor10) & ~empty))
        rank_new = np.sum(sc[:, new_cols] > ts[:, None], axis=1)  # new items scoring above the target
        for s in SLOTS:
            hit = (rank_new < s) & ~empty
            placed[s] += int(np.sum(hit))
            gated[s] += int(np.sum(hit & (ts >= floor10)))
    n = len(q)

    def r(x: int) -> float:
        return round(x / n, 6) if n else 0.0

    return {"users": n, "content_top10": r(content), "placed": {str(s): r(v) for s, v in placed.items()},
            "placed_within10": {str(s): r(v) for s, v in gated.items()}}


def pairs(last: list[int], want: list[int], emb: np.ndarray, chunk: int = 1024) -> dict[str, Any]:
    """How near each new-item buyer's last item is to what they bought (catalog rows; -1: no last item, counted as
    near nothing): the shares whose cosine reaches 0.5 / 0.65, whose target is among the last item's 10 / 20
    nearest catalog items, and both (within 20 and >= 0.65: the gate and floor the Beauty bench chose)."""
    n = len(last)
    c = {"cos_0.5": 0, "cos_0.65": 0, "within_10": 0, "within_20": 0, "within_20_cos_0.65": 0, "within_10_cos_0.5": 0}
    li_all, t_all = np.array(last), np.array(want)
    for a in range(0, n, chunk):
        li, t = li_all[a:a + chunk], t_all[a:a + chunk]
        ok = li >= 0
        sc = emb[li[ok]] @ emb.T
        rows = np.arange(len(sc))
        sc[rows, li[ok]] = -np.inf
        ct = sc[rows, t[ok]]
        rank = np.sum(sc > ct[:, None], axis=1) + 1
        for key, hit in (("cos_0.5", ct >= 0.5), ("cos_0.65", ct >= 0.65), ("within_10", rank <= 10),
                         ("within_20", rank <= 20), ("within_20_cos_0.65", (rank <= 20) & (ct >= 0.65)),
                         ("within_10_cos_0.5", (rank <= 10) & (ct >= 0.5))):
            c[key] += int(np.sum(hit))
    return {"users": n, **{k: round(v / n, 6) if n else 0.0 for k, v in c.items()}}


def density(items: list[int], emb: np.ndarray) -> dict[str, float]:
    """How crowded the text space is around a set of items (catalog rows): the mean cosine of each one's 1st, 10th
    and 20th nearest other catalog item."""
    if not items:
        return {"items": 0}
    r = np.array(items)
    sc = emb[r] @ emb.T
    sc[np.arange(len(r)), r] = -np.inf
    top = -np.sort(-sc, axis=1)[:, :20]
    return {"items": len(items), **{f"nn{k}": round(float(top[:, k - 1].mean()), 6) for k in (1, 10, 20)
                                    if top.shape[1] >= k}}


def placements(last: list[int], new_cols: np.ndarray, emb: np.ndarray, floors: tuple[float, ...] = PLACE_FLOORS,
               slots: int = 3, chunk: int = 1024) -> dict[str, Any]:
    """How much a last-item placement of the new items (``new_cols``) takes from a list, for users whose target is
    a seen item (where its cost falls): per cosine floor, ungated and within the last item's 10 nearest catalog
    items, the mean number of new items placed (up to ``slots``) and the share of users given at least one; and
    the mean cosine of the last item's nearest new item. Users without a last item count as placing none."""
    n = len(last)
    is_new = np.zeros(len(emb), dtype=bool)
    is_new[new_cols] = True
    placed = {(f, w): 0 for f in floors for w in (0, 10)}
    anyone = dict(placed)
    nearest = 0.0
    li_all = np.array(last)
    for a in range(0, n, chunk):
        li = li_all[a:a + chunk]
        ok = li >= 0
        sc = emb[li[ok]] @ emb.T
        rows = np.arange(len(sc))
        sc[rows, li[ok]] = -np.inf
        floor10 = np.partition(sc, sc.shape[1] - 10, axis=1)[:, sc.shape[1] - 10]
        new_sc = sc[:, new_cols]
        nearest += float(np.sum(new_sc.max(axis=1)))
        for f in floors:
            for w in (0, 10):
                ok_new = (new_sc >= f) & ((new_sc >= floor10[:, None]) if w else True)
                k = np.minimum(ok_new.sum(axis=1), slots)
                placed[(f, w)] += int(k.sum())
                anyone[(f, w)] += int(np.sum(k > 0))

    def r(x: float) -> float:
        return round(x / n, 6) if n else 0.0

    return {"users": n, "slots": slots, "nearest_new_cosine": r(nearest),
            "by_floor": [{"min_cosine": f, "within": w, "placed_per_user": r(placed[(f, w)]),
                          "users_with_a_placement": r(anyone[(f, w)])} for f in floors for w in (0, 10)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--name", required=True)
    ap.add_argument("--set", nargs="*", default=[])
    args = ap.parse_args(argv)

    import pyarrow.compute as pc

    from grlm_ray.bench.cold_start import ARRIVAL_POOLS, arrival_pools, held_out_rows
    from grlm_ray.bench.common import write_result
    from grlm_ray.core.config import load_config
    from grlm_ray.core.run import Run
    from grlm_ray.core.schemas import SEQUENCES, TARGETS
    from grlm_ray.flows.pipeline import run_pipeline
    from grlm_ray.lib.embeddings import catalog_embeddings
    from grlm_ray.lib.protocol import target_rows

    t0 = time.time()
    cfg = load_config(args.config, args.set)
    run_pipeline(cfg, stages=("prepare", "embed"))
    run = Run.of(cfg)
    seqs = run.read_table("prepare", "sequences.parquet", SEQUENCES)
    targets = run.read_table("prepare", "targets.parquet", TARGETS)
    held = set(run.read_table("prepare", "holdout_items.parquet").column("item_id").to_pylist())
    rows_new, no_text = held_out_rows(run)
    ids, emb = catalog_embeddings(cfg, rows_new)  # the base run: the new runs copy its embed stage
    emb = emb.astype(np.float32)
    at = {i: n for n, i in enumerate(ids)}

    def users(split: str) -> tuple[list[list[str]], list[str]]:
        t = target_rows(targets, split, None, cfg.eval.seed)
        hist = seqs.column("item_ids").take(pc.index_in(t.column("user_id"), value_set=seqs.column("user_id")))
        return ([h[:p] for h, p in zip(hist.to_pylist(), t.column("position").to_pylist())],
                t.column("target_item_id").to_pylist())

    def measure(hists: list[list[str]], want: list[str], new_items: list[str]) -> dict[str, Any]:
        pool = set(new_items)
        keep = [j for j, x in enumerate(want) if x in pool and x in at]
        # the arrivals taken out of the histories, as the holdout takes the real ones (a no-op for them): as the
        # bench's simulation does
        hs = [[x for x in hists[j] if x not in pool] for j in keep]
        last = [at.get(h[-1], -1) if h else -1 for h in hs]
        cols = np.array(sorted(at[i] for i in new_items if i in at))
        tgt = [at[want[j]] for j in keep]
        return {**{name: found(query_vectors(emb, at, hs, m, w), last, tgt, cols, emb) for name, m, w in QUERIES},
                "pairs": pairs(last, tgt, emb)}

    h = cfg.data.holdout
    pools = arrival_pools(run, seqs, len(held), h.candidates, h.seed, ARRIVAL_POOLS)
    vh, vw = users("valid")
    per_pool = [measure(vh, vw, pool) for pool in pools]
    simulated = {}
    n_all = sum(p["pairs"]["users"] for p in per_pool)
    simulated_pairs = {"users": n_all, **{k: round(sum(p["pairs"][k] * p["pairs"]["users"] for p in per_pool) / n_all, 6)
                                          for k in per_pool[0]["pairs"] if k != "users"}} if n_all else None
    for name, *_ in QUERIES:  # pooled over the pools: hits / users
        parts = [p[name] for p in per_pool]
        n = sum(p["users"] for p in parts)

        def pooled(key: str, sub: str | None = None) -> float:
            return round(sum((p[key][sub] if sub else p[key]) * p["users"] for p in parts) / n, 6) if n else 0.0

        simulated[name] = {"users": n, "content_top10": pooled("content_top10"),
                           "placed": {str(s): pooled("placed", str(s)) for s in SLOTS},
                           "placed_within10": {str(s): pooled("placed_within10", str(s)) for s in SLOTS}}
    th, tw = users("test")
    real = measure(th, tw, sorted(i for i in held if i in at))
    real_pairs = real.pop("pairs")
    # the placement's cost side: on the seen-target users of each split, how many of the real held-out items a
    # last-item placement would put in their lists (validation: what the bench's tuning run sees)
    real_cols = np.array(sorted(at[i] for i in held if i in at))

    def seen_last(hists: list[list[str]], want: list[str]) -> list[int]:
        return [at.get(h[-1], -1) if h else -1 for h, x in zip(hists, want) if x not in held]

    cost_side = {"valid": placements(seen_last(vh, vw), real_cols, emb),
                 "test": placements(seen_last(th, tw), real_cols, emb)}
    # are the stand-ins' surroundings in text space the real arrivals'? (each set's own nearest catalog items)
    item_density = {"real": density(real_cols.tolist(), emb),
                    "pools": [density([at[i] for i in pool if i in at], emb) for pool in pools]}
    result = {"run": cfg.run.name, "config": args.config, "overrides": args.set,
              "queries": {name: {"m": m, "w": w} for name, m, w in QUERIES},
              "simulated_arrivals": {"pools": ARRIVAL_POOLS, "pool_items": len(held), "split": "valid",
                                     "histories": "each pool's members taken out", "by_query": simulated,
                                     "pairs": simulated_pairs},
              "real_arrivals": {"split": "test", "new_items": len(held), "without_text": len(no_text),
                                "by_query": real, "pairs": real_pairs},
              "placements_on_seen_targets": cost_side, "item_density": item_density,
              "seconds": round(time.time() - t0, 1),
              "command": " ".join(["python benchmarks/isolation/arrival_queries.py", args.config, "--name",
                                   args.name, "--set", *args.set])}
    path = write_result(args.name, result, RESULTS)
    print("item density (mean cosine of the 1st / 10th / 20th nearest catalog item): real "
          + str(item_density["real"]) + "; pools " + "; ".join(str(d) for d in item_density["pools"]))
    for label, pr in (("simulated", simulated_pairs), ("real", real_pairs)):
        print(f"{label} arrivals' buyers, last item vs target: " + ", ".join(f"{k} {v}" for k, v in (pr or {}).items()))
    for label, table in (("simulated arrivals (valid)", simulated), ("real arrivals (test)", real)):
        print(f"{label}: users {next(iter(table.values()))['users']}")
        print(f"{'query':>8s} {'content10':>9s} " + " ".join(f"{'p' + str(s):>6s}" for s in SLOTS) + "  "
              + " ".join(f"{'w10p' + str(s):>7s}" for s in SLOTS))
        for name, v in table.items():
            print(f"{name:>8s} {v['content_top10']:9.4f} " + " ".join(f"{v['placed'][str(s)]:6.4f}" for s in SLOTS)
                  + "  " + " ".join(f"{v['placed_within10'][str(s)]:7.4f}" for s in SLOTS))
    for split, v in cost_side.items():
        print(f"placements, seen-target users ({split}, {v['users']}; nearest new item's cosine "
              f"{v['nearest_new_cosine']:.4f}): " + ", ".join(
                  f"cos>={p['min_cosine']}{' w10' if p['within'] else ''} {p['placed_per_user']:.4f}/"
                  f"{p['users_with_a_placement']:.4f}" for p in v["by_floor"]))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
