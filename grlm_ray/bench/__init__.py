"""``grlm bench <name>``: every benchmark under one harness.

Each benchmark module has ``add_args(parser)`` and ``run(args) -> dict``; the harness prints the result's
table(s) (``rows``, or ``tables`` [{title, rows}]) and its ``ratios``, and writes the whole result with
the machine description to ``<out-dir>/<name>.json`` (default ``benchmarks/results/``). Benchmarks
compare settings side by side in one run and report ratios; none of them is a unit test.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
from typing import Any

log = logging.getLogger(__name__)

# name -> (module, what it measures)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "quality": ("quality", "GRLM vs SASRec-CE vs popularity on the same test users (+ w/o GTI, unconstrained); "
                           "CONFIG [key=value ...], bench.mode=sample|full"),
    "cold-start": ("cold_start", "items held out of training join the catalog as serving adds them: R/N@10 on new- "
                                 "and seen-item targets, GRLM vs content, SASRec, popularity; CONFIG with data.holdout"),
    "joint": ("joint", "one joint model vs one model per domain, per domain on the same test users: R/N@10, "
                       "the other-domain share of the top 10, training minutes (trained runs: JOINT_CONFIG --single)"),
    "eig": ("eig", "EIG vs the reference algorithm (Beauty, authors' TIDs) and EIG latency at 1M items"),
    "decoding": ("decoding", "beam search: constrained vs unconstrained, batched vs one user at a time, "
                             "ours vs transformers generate (a trained run: grlm demo)"),
    "training": ("training", "IIFT throughput on Beauty: packing vs padding, 1 vs 2 DDP workers"),
    "recipe-speed": ("recipe_speed", "IIFT throughput of the CPU quality recipe: fp32 vs bf16, DDP vs one process"),
    "ray-scaling": ("ray_scaling", "embedding and CTG items/s with 1 and 2 Ray Data workers"),
    "serve-load": ("serve_load", "Ray Serve load test (loopback, bounded) and a replica-kill fault run"),
    "ctg-llms": ("ctg_llms", "CTG with the offline LLMs (x few-shot) vs statistical CTG on the same items: legality, "
                             "items/s, collisions, first term = product type"),
    "scale": ("scale", "time and peak RSS of every LLM-free stage at the joint-10 shape, 300k and 1M items; "
                       "log-log slopes and a plot"),
    "vllm-parity": ("vllm_parity", "vLLM (CPU build) vs transformers: same greedy output, timings"),
}


def module(name: str) -> Any:
    from grlm_ray.core.errors import ConfigError

    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"grlm_ray.bench.{BENCHMARKS[name][0]}")


def report(name: str, result: dict[str, Any], out_dir: str, file_name: str | None = None) -> str:
    """Print the tables and ratios of ``result`` and write it (+ machine) as JSON; returns the path."""
    from grlm_ray.bench.common import format_table, write_result

    tables = result.get("tables") or [{"title": name, "rows": result.get("rows", []),
                                       "columns": result.get("columns")}]
    for t in tables:
        print(f"\n{t['title']}")
        print(format_table(t["rows"], t.get("columns")))
    if result.get("ratios"):
        print("\nratios: " + json.dumps(result["ratios"]))
    path = write_result(name, result, out_dir, file_name)
    print(f"\nwritten {path}")
    return str(path)


def main(name: str, argv: list[str]) -> int:
    from grlm_ray.bench.common import DEFAULT_OUT

    mod = module(name)
    ap = argparse.ArgumentParser(prog=f"grlm bench {name}", description=BENCHMARKS[name][1])
    mod.add_args(ap)
    if not any(a.dest == "out_dir" for a in ap._actions):
        ap.add_argument("--out-dir", default=DEFAULT_OUT, help="where the JSON result goes")
    ap.add_argument("--tag", default=None, help="appended to the result's file name (e.g. a machine: h200)")
    args = ap.parse_args(argv)
    result = mod.run(args)
    out_dir = result.pop("out_dir", None) or getattr(args, "out_dir", None) or DEFAULT_OUT
    file_name = result.pop("file_name", None) or name.replace("-", "_")
    report(name, result, out_dir, f"{file_name}_{args.tag}" if args.tag else file_name)
    return 0
