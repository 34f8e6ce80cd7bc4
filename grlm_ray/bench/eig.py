"""EIG benchmarks, side by side in one run.

1. Our EIG vs the reference algorithm as published (re-implemented here, and only here, from the
   GRLM evaluation script's description: exact key lookup, else a scan of the whole vocabulary per
   generated word with equal=1.0 / containment=0.8 similarity and 1/(j+1) position weights) on the
   authors' Beauty TIDs: queries/s and top-item agreement.
2. EIG latency per query on a 1M-item synthetic catalog (direct and structural queries).

    grlm bench eig [--shared ../shared/data/amazon2014] [--queries 1000] [--scale-items 1000000]

Writes benchmarks/results/eig.json with the machine description.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from grlm_ray.bench.common import DEFAULT_SHARED
from grlm_ray.lib.eig import TidIndex


class ReferenceEIG:
    """The published algorithm, for comparison only."""

    def __init__(self, item_ids, tids):
        self.tid2ids: dict[str, list[str]] = {}
        for i, t in zip(item_ids, tids):
            self.tid2ids.setdefault(",".join(t), []).append(i)
        self.word_to_keys: dict[str, list[str]] = defaultdict(list)
        for key in self.tid2ids:
            for w in key.split(","):
                self.word_to_keys[w].append(key)

    def top(self, terms):
        key = ",".join(terms)
        if key in self.tid2ids:
            return self.tid2ids[key][0], "direct"
        scores: dict[str, float] = defaultdict(float)
        for j, q in enumerate(terms):
            w = 1.0 / (j + 1)
            for cand, keys in self.word_to_keys.items():
                sim = 1.0 if q == cand else (0.8 if (q in cand or cand in q) else 0.0)
                if sim:
                    for k in keys:
                        scores[k] += sim * w
        if not scores:
            return None, "none"
        best = sorted(scores.items(), key=lambda x: x[1], reverse=True)[0][0]
        return self.tid2ids[best][0], "structural"


def make_queries(tids, vocab, n, rng):
    exact = [list(tids[i]) for i in rng.integers(0, len(tids), n)]
    perturbed = []
    for i in rng.integers(0, len(tids), n):
        t = list(tids[i])
        for j in rng.choice(len(t), size=2, replace=False):
            t[j] = vocab[rng.integers(0, len(vocab))]
        perturbed.append(t)
    return exact, perturbed


def timed(fn, queries):
    t = time.perf_counter()
    out = [fn(q) for q in queries]
    return out, time.perf_counter() - t


def bench_reference(shared: Path, n: int, rng) -> dict:
    import pyarrow.parquet as pq

    t = pq.read_table(shared / "beauty" / "items.parquet", columns=["item_id", "tid"]).to_pylist()
    rows = [(str(r["item_id"]), r["tid"]) for r in t if r["tid"]]
    ids, tids = [r[0] for r in rows], [r[1] for r in rows]
    vocab = sorted({w for x in tids for w in x})
    exact, perturbed = make_queries(tids, vocab, n, rng)
    ref = ReferenceEIG(ids, tids)
    ours = TidIndex(ids, tids)
    ours_sub = TidIndex(ids, tids, match="substring")
    res = {"catalog_items": len(ids), "vocabulary": len(vocab), "queries_each": n}
    for name, qs in (("exact", exact), ("structural", perturbed)):
        r_out, r_s = timed(ref.top, qs)
        o_out, o_s = timed(lambda q: ours.ground_one(q), qs)
        s_out, s_s = timed(lambda q: ours_sub.ground_one(q), qs)
        top_o = [str(ours.item_ids[i[0]]) if len(i) else None for i, _ in o_out]
        top_s = [str(ours_sub.item_ids[i[0]]) if len(i) else None for i, _ in s_out]
        top_r = [x for x, _ in r_out]
        # ties: the reference orders equal scores by first-seen key, we by catalog order
        ref_scores = []
        for q, r_top, s_top in zip(qs, top_r, top_s):
            if r_top == s_top or name == "exact":
                ref_scores.append(True)
                continue
            items, sc = ours_sub.structural(q, 50)
            pos = {str(ours_sub.item_ids[i]): s for i, s in zip(items, sc)}
            ref_scores.append(abs(pos.get(r_top, -1) - pos.get(s_top, -2)) < 1e-9)
        res[name] = {
            "reference_qps": round(len(qs) / r_s, 1), "ours_exact_qps": round(len(qs) / o_s, 1),
            "ours_substring_qps": round(len(qs) / s_s, 1),
            "speedup_exact_mode": round(r_s / o_s, 1), "speedup_substring_mode": round(r_s / s_s, 1),
            "same_top_item_substring_mode": round(float(np.mean([a == b for a, b in zip(top_r, top_s)])), 4),
            "same_top_score_substring_mode": round(float(np.mean(ref_scores)), 4),
            "same_top_item_exact_mode": round(float(np.mean([a == b for a, b in zip(top_r, top_o)])), 4),
        }
    return res


def synthetic_tids(n_items: int, seed: int):
    """TIDs shaped like real CTG output at any size: statistical CTG (no neighbours) over a synthetic catalog
    with realistic text (Zipf words, a vocabulary that grows with the catalog: ``text: zipf``)."""
    from grlm_ray.core.config import SyntheticSource
    from grlm_ray.lib.lexical import LexicalTermWriter
    from grlm_ray.stages.prepare.synthetic import generate

    items, _ = generate(SyntheticSource(kind="synthetic", num_items=n_items, num_users=10, seed=seed, text="zipf"))
    ids = items.column("item_id").to_pylist()
    writer = LexicalTermWriter(items.to_pylist(), None, 5)
    del items
    tids = writer.tids(ids)
    return ids, [tids[i] for i in ids]


def grounding_latency(index: TidIndex, queries) -> dict[str, float]:
    """p50 / p99 / mean microseconds of ``index.ground_one`` over ``queries``, one at a time."""
    lat = []
    for q in queries:
        t = time.perf_counter()
        index.ground_one(q)
        lat.append(time.perf_counter() - t)
    us = np.asarray(lat) * 1e6
    return {"p50_us": round(float(np.percentile(us, 50)), 1), "p99_us": round(float(np.percentile(us, 99)), 1),
            "mean_us": round(float(us.mean()), 1)}


def bench_scale(n_items: int, n: int, rng) -> dict:
    t0 = time.time()
    ids, tids = synthetic_tids(n_items, 0)
    gen_s = time.time() - t0
    t0 = time.time()
    index = TidIndex(ids, tids)
    build_s = time.time() - t0
    vocab = sorted(index.vocab)
    exact, perturbed = make_queries(tids, vocab, n, rng)
    res = {"catalog_items": n_items, "distinct_tids": len(index.direct), "vocabulary": len(index.vocab),
           "generate_seconds": round(gen_s, 1), "index_build_seconds": round(build_s, 1)}
    # first pass: cold (a large catalog's posting-list sets are built on first touch); second: warm, as a
    # serving replica runs after its first queries
    for name, qs in (("direct", exact), ("structural", perturbed), ("structural_warm", perturbed)):
        res[name] = grounding_latency(index, qs)
        g = index.rank([" ".join(q) for q in qs[:20]], 10)
        res[name]["rank_k10_len"] = len(g.items)
        # the same top-20 (items and scores) as the vectorized exact scan, query by query
        same = [np.array_equal(index.structural(q, 20)[0], index._structural_scan(q, 20)[0]) for q in qs[:200]]
        res[name]["same_top20_as_scan"] = round(float(np.mean(same)), 4)
    return res


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shared", default=DEFAULT_SHARED, help="amazon2014 bundle folder (Beauty, authors' TIDs)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--scale-items", type=int, default=1_000_000)


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {"args": vars(args), "tables": []}
    shared = Path(args.shared)
    if (shared / "beauty" / "items.parquet").is_file():
        ref = result["vs_reference_beauty"] = bench_reference(shared, args.queries, rng)
        result["tables"].append({"title": f"EIG vs the reference algorithm, Beauty ({ref['catalog_items']} items)",
                                 "rows": [{"queries": k, **ref[k]} for k in ("exact", "structural")]})
    else:
        result["skipped"] = f"vs reference: {shared}/beauty/items.parquet not found"
    sc = result["scale"] = bench_scale(args.scale_items, args.queries, rng)
    result["tables"].append({"title": f"EIG latency, {sc['catalog_items']:,} synthetic items "
                                      f"(index built in {sc['index_build_seconds']} s)",
                             "rows": [{"queries": k, **sc[k]} for k in ("direct", "structural", "structural_warm")]})
    return result
