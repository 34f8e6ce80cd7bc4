"""Embedding and CTG throughput (items/s) with 1 and 2 Ray Data workers, side by side in one run.

    .venv/bin/python benchmarks/ray_scaling.py --embed-items 3000 --ctg-items 24

Writes benchmarks/results/ray_scaling.json (with the machine description) and prints a table.
Embedding: wall time of the stage (model loading included); CTG: the stage's generation time (actor start
and model loading included, the one-off GGUF conversion excluded). A fresh run root per setting.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--embed-items", type=int, default=3000)
    ap.add_argument("--ctg-items", type=int, default=24)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ray_scaling.json"))
    args = ap.parse_args()

    from grlm_ray.config import load_config
    from grlm_ray.ctg import ctg
    from grlm_ray.embed import embed
    from grlm_ray.neighbors import neighbors
    from grlm_ray.prepare import prepare

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
    result = {"benchmark": "ray_scaling", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": describe(),
              "args": vars(args), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'stage':6s} {'workers':>7s} {'items':>6s} {'seconds':>8s} {'items/s':>8s} {'vs 1':>6s}")
    for r in rows:
        print(f"{r['stage']:6s} {r['workers']:7d} {r['items']:6d} {r['seconds']:8.1f} {r['items_per_second']:8.2f} "
              f"{r.get('speedup_vs_1_worker', 1):6.2f}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
