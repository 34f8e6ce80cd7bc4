"""Isolation experiment for issue 17: where the IVF neighbours' time goes as the catalog grows, and why its
recall falls.

Builds the neighbours stage's own index (``training_rows`` + ``new_faiss_index``: the same lists, quantizer
and settings) over a run's embeddings artifact in one process with two faiss threads, and times each part
separately: training, adding every vector (list assignment through the quantizer), the quantizer alone, and
the search per query; the lists' imbalance factor (1 = equal lengths; a query's scan cost grows with it).
Then recall@10 against exact search on 1,000 seeded items, with the stage's HNSW quantizer at two
``efSearch`` values and with an exact quantizer over the same centroids, at several ``nprobe``: what the
quantizer loses vs what the lists themselves lose. And where the exact neighbours live: the rank of
their list among the query's lists in exact centroid order. And the per-query cost with the queries in
random order, grouped by list, or grouped by a coarse cluster (cache reuse of the lists scanned).

    python benchmarks/isolation/ivf_cost_parts.py <run config.yaml> [...] \
        --out benchmarks/results/ivf_cost_parts.json

Run it on the bench's own runs (``grlm bench scale --root R`` writes ``R/scale-<size>.yaml``) after their
embed step, one size after the other on an otherwise idle machine. Results: README "Scale", pass 5.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from grlm_ray.core.config import load_config
from grlm_ray.core.run import Run
from grlm_ray.stages.neighbors import ivf_nlist, new_faiss_index, training_rows


def measure(cfg_path: str, queries: int, sample: int) -> dict:
    import faiss

    faiss.omp_set_num_threads(2)
    cfg = load_config(cfg_path, [])
    run = Run.of(cfg)
    ids, base = run.store.read_embeddings(run.rel("embed", "embeddings.parquet"))
    n, d = base.shape
    nc = cfg.neighbors
    out: dict = {"config": cfg_path, "items": n, "nlist": ivf_nlist(nc, n), "list_size": nc.ivf_list_size}
    t = time.perf_counter()
    train = base[training_rows(nc, n, "ivf")]
    index = new_faiss_index(train, n, nc, "ivf")
    out.update(train_rows=len(train), train_s=round(time.perf_counter() - t, 2))
    del train
    t = time.perf_counter()
    index.add(base)
    out["add_s"] = round(time.perf_counter() - t, 2)
    out["imbalance_factor"] = round(float(index.invlists.imbalance_factor()), 3)
    rng = np.random.default_rng(0)
    q = base[rng.choice(n, min(n, queries), replace=False)]
    quant = index.quantizer
    t = time.perf_counter()
    quant.search(q, nc.ivf_nprobe)
    out["quantizer_us_per_query"] = round((time.perf_counter() - t) / len(q) * 1e6, 1)
    index.nprobe = nc.ivf_nprobe
    t = time.perf_counter()
    index.search(q, nc.k + 1)
    out["search_us_per_query"] = round((time.perf_counter() - t) / len(q) * 1e6, 1)

    # query order: the same queries in random order, by their list, by a coarse cluster (sqrt(nlist) k-means
    # on a sample): does reusing lists already in cache change the per-query cost, and does it change its growth?
    import math

    sub = rng.choice(n, min(n, 5 * queries), replace=False)
    _, own_list = quant.search(base[sub], 1)
    k1 = max(1, int(math.sqrt(index.nlist)))
    km = faiss.Kmeans(d, k1, niter=10, seed=1, spherical=True)
    km.train(base[rng.choice(n, min(n, 100 * k1), replace=False)])
    _, coarse = km.index.search(base[sub], 1)
    index.nprobe = nc.ivf_nprobe
    out["query_order_us_per_query"] = {}
    for name, order in (("random", sub), ("by_list", sub[np.argsort(own_list.ravel(), kind="stable")]),
                        ("by_coarse_cluster", sub[np.argsort(coarse.ravel(), kind="stable")])):
        t = time.perf_counter()
        for s in range(0, len(order), nc.query_batch):
            index.search(base[order[s:s + nc.query_batch]], nc.k + 1)
        out["query_order_us_per_query"][name] = round((time.perf_counter() - t) / len(order) * 1e6, 1)

    rows = rng.choice(n, min(n, sample), replace=False)
    qs = base[rows]
    exact = np.concatenate([np.argsort(-(qs[s:s + 100] @ base.T), axis=1)[:, :nc.k + 1]
                            for s in range(0, len(rows), 100)])
    truth = [[x for x in e.tolist() if x != r][:nc.k] for e, r in zip(exact, rows)]

    def recall(found: np.ndarray) -> float:
        return round(float(np.mean([len(set(f.tolist()) & set(t)) / nc.k for f, t in zip(found, truth)])), 4)

    curves = []
    hnsw = faiss.downcast_index(quant) if "HNSW" in type(faiss.downcast_index(quant)).__name__ else None
    for ef in ((64, 256) if hnsw is not None else (None,)):
        if hnsw is not None:
            hnsw.hnsw.efSearch = ef
        for p in (16, 64):
            index.nprobe = p
            t = time.perf_counter()
            _, got = index.search(qs, nc.k + 1)
            curves.append({"quantizer": "hnsw" if hnsw is not None else "flat", "ef_search": ef, "nprobe": p,
                           "recall_at_10": recall(got), "us_per_query": round((time.perf_counter() - t) / len(qs) * 1e6, 1)})
    centroids = quant.reconstruct_n(0, index.nlist)
    flat = faiss.IndexFlatIP(d)
    flat.add(centroids)
    index.quantizer = flat  # same lists, probed in exact centroid order
    for p in (16, 64, 256):
        index.nprobe = p
        _, got = index.search(qs, nc.k + 1)
        curves.append({"quantizer": "exact", "ef_search": None, "nprobe": p, "recall_at_10": recall(got)})
    index.quantizer = quant
    out["recall"] = curves
    # the rank of each exact neighbour's list among the query's lists in exact centroid order
    members = np.unique(np.array([x for t in truth for x in t]))
    _, lists = flat.search(base[members], 1)
    list_of = dict(zip(members.tolist(), lists.ravel().tolist()))
    _, order = flat.search(qs, 256)
    ranks = np.array([{lst: k for k, lst in enumerate(o.tolist())}.get(list_of[x], 256)
                      for o, t in zip(order, truth) for x in t])
    out["neighbour_list_rank"] = {"p50": float(np.percentile(ranks, 50)), "p90": float(np.percentile(ranks, 90)),
                                  **{f"share_in_top_{k}": round(float((ranks < k).mean()), 4) for k in (16, 64, 256)}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="+", help="run configs (one size each), measured in this order")
    ap.add_argument("--queries", type=int, default=20000, help="queries timed")
    ap.add_argument("--sample", type=int, default=1000, help="items whose recall is checked against exact search")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = []
    for c in args.configs:
        runs.append(measure(c, args.queries, args.sample))
        print(json.dumps(runs[-1]), flush=True)
    res = {"benchmark": "ivf_cost_parts", "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "machine": {"platform": platform.platform(), "processor": platform.processor()}, "runs": runs}
    if len(runs) > 1:
        a, b = runs[0], runs[-1]
        r = np.log(b["items"] / a["items"])
        # time slopes of the whole catalog's work: a per-query cost times the number of queries (= items)
        res["time_slopes"] = {k: round(float(np.log(b[k] / a[k]) / r), 2) for k in ("train_s", "add_s")} | {
            k.replace("_us_per_query", "_all_items"): round(1 + float(np.log(b[k] / a[k]) / r), 2)
            for k in ("quantizer_us_per_query", "search_us_per_query")}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
