"""Embedding and CTG throughput (items/s) with 1 and 2 Ray Data workers, side by side in one run.

    grlm bench ray-scaling [--embed-items 3000] [--ctg-items 24] [--workers 1 2]

Writes benchmarks/results/ray_scaling.json (with the machine description) and prints a table.
Embedding: wall time of the stage (model loading included); CTG: the stage's generation time (actor start
and model loading included, the one-off GGUF conversion excluded). A fresh run root per setting.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--embed-items", type=int, default=3000)
    ap.add_argument("--ctg-items", type=int, default=24)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from grlm_ray.core.config import load_config
    from grlm_ray.stages.ctg import ctg
    from grlm_ray.stages.embed import embed
    from grlm_ray.stages.neighbors import neighbors
    from grlm_ray.stages.prepare import prepare

    rows = []
    with tempfile.TemporaryDirectory() as root:
        base = [f"run.root={root}", "tracking.enabled=false", "ray.progress_bars=false",
                f"data.domains.demo.num_items={args.embed_items}",
                f"data.domains.demo.num_users={args.embed_items * 3}"]
        for w in args.workers:
            cfg = load_config(None, base + [f"run.name=w{w}", f"embed.num_workers={w}"])
            prepare(cfg)
            t = time.time()
            m = embed(cfg)
            rows.append({"stage": "embed", "workers": w, "items": m["outputs"]["embeddings.parquet"],
                         "seconds": round(time.time() - t, 2)})
            neighbors(cfg)
            ccfg = load_config(None, base + [f"run.name=w{w}", f"embed.num_workers={w}", f"ctg.num_workers={w}",
                                             f"ctg.limit={args.ctg_items}", "ctg.retries=0", "ctg.llm.batch_size=8"])
            t = time.time()
            m = ctg(ccfg)
            rows.append({"stage": "ctg", "workers": w, "items": m["info"]["items"],
                         "seconds": round(time.time() - t, 2),
                         "generation_seconds": m["info"]["generation_seconds"]})
    for r in rows:
        # CTG: the stage's generation clock (the one-off GGUF conversion before the first run is excluded)
        r["items_per_second"] = round(r["items"] / r.get("generation_seconds", r["seconds"]), 3)
    for stage in ("embed", "ctg"):
        one = next((r for r in rows if r["stage"] == stage and r["workers"] == 1), None)
        for r in rows:
            if r["stage"] == stage and one:
                r["speedup_vs_1_worker"] = round(r["items_per_second"] / one["items_per_second"], 3)
    return {"args": vars(args), "rows": rows}
