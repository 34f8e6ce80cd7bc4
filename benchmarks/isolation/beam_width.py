"""Isolation experiment for issue 14: how much recall the beam width leaves on the table.

Scores one trained checkpoint of a run (``train/best`` by default, the weights the validation loop kept)
on the run's own validation users (``train/validation.parquet``: valid targets, never test ones) with the
project's ``validation.Validator`` — the same constrained beam search, EIG grounding and metric code as
training's validation and ``grlm eval`` — once per beam width. Only the width changes, so differences
are paired (same users, same model).

    python benchmarks/isolation/beam_width.py --run <root>/<run> --beams 10,20,40 \
        [--weights best|model] [--threads 2] [--out benchmarks/results/beam_width_beauty.json]

Results (Beauty, 2 vCPU): benchmarks/results/beam_width_beauty.json; README "Quality on Beauty".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grlm_ray.lib.validation import Validator, reduce_metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run folder with a finished or running train/ stage")
    ap.add_argument("--beams", default="10,20,40")
    ap.add_argument("--weights", choices=("best", "model"), default="best")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    train = os.path.join(a.run, "train")
    if a.weights == "best":
        model = AutoModelForCausalLM.from_pretrained(os.path.join(train, "base"), dtype=torch.float32)
        model.load_state_dict(torch.load(os.path.join(train, "best", "model.pt"), map_location="cpu"))
        with open(os.path.join(train, "best", "meta.json")) as f:
            meta = json.load(f)
    else:
        model = AutoModelForCausalLM.from_pretrained(os.path.join(train, "model"), dtype=torch.float32)
        meta = {}
    tok = AutoTokenizer.from_pretrained(os.path.join(train, "base"))
    queries = pq.read_table(os.path.join(train, "validation.parquet"))
    catalog = pq.read_table(os.path.join(train, "catalog.parquet"))
    rows = []
    for b in [int(x) for x in a.beams.split(",")]:
        v = Validator(queries, catalog, tok, num_beams=b, batch_size=a.batch_size, max_new_tokens=30,
                      decay="reciprocal", match="exact", rank=0, world=1)
        t0 = time.time()
        r = reduce_metrics(v.sums(model), 1)
        rows.append({"num_beams": b, **{k: round(x, 6) if isinstance(x, float) else x for k, x in r.items()},
                     "seconds": round(time.time() - t0, 1)})
        print(f"beams {b:3d}: R@5 {r['recall_at_5']:.4f} N@5 {r['ndcg_at_5']:.4f} R@10 {r['recall_at_10']:.4f} "
              f"N@10 {r['ndcg_at_10']:.4f} VR@10 {r['vr_at_10']:.3f} ({r['users']} users, {rows[-1]['seconds']} s)",
              flush=True)
    if a.out:
        report = {"run": a.run, "weights": a.weights, "checkpoint": meta, "rows": rows,
                  "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads": a.threads}}
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
