"""Score a run's best checkpoint (``train/best``, chosen on validation) once on the TEST targets of every
user (or a seeded sample), in one process, with the training-time validator: the evaluation's own prompts,
constrained beam search, EIG and metric code. For a run whose training was stopped before its stage
finished (no exported model yet), so its validation-chosen checkpoint can still be scored.

    python benchmarks/isolation/score_best_on_test.py CONFIG [--users N] [--threads 2] [--out NAME]

Writes benchmarks/results/<NAME>.json (default test_<run>_best.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--users", type=int, default=None, help="a seeded sample (default: every test user)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beams", type=int, default=None, help="default: the config's eval.num_beams")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import pyarrow as pa
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grlm_ray.core.config import load_config
    from grlm_ray.lib.protocol import build_queries
    from grlm_ray.core.run import Run
    from grlm_ray.lib.validation import Validator, build_validation_set, reduce_metrics

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [])
    run = Run.of(cfg)
    items = run.read_table("prepare", "items.parquet")
    seqs = run.read_table("prepare", "sequences.parquet")
    targets = run.read_table("prepare", "targets.parquet")
    terms_t = run.read_table("sft", "terms.parquet")
    base = run.path("train", "base")
    best = run.path("train", "best")
    meta = json.load(open(Path(best) / "meta.json"))
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    state = torch.load(Path(best) / "model.pt", map_location="cpu")
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=False)
    model.eval()
    _, catalog = build_validation_set(cfg, items, seqs, targets, terms_t, tok)
    tcfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"split": "test", "limit_users": args.users})})
    terms = dict(zip(terms_t.column("item_id").to_pylist(), terms_t.column("terms").to_pylist()))
    queries = build_queries(tcfg, items, seqs, targets, terms, tok)
    qt = pa.table({k: pa.array([q[k] for q in queries], pa.string())
                   for k in ("user_id", "domain", "target_item_id", "prompt")})
    v = Validator(qt, catalog, tok, num_beams=args.beams or cfg.eval.num_beams, batch_size=cfg.eval.batch_size,
                  max_new_tokens=cfg.eval.max_new_tokens, decay=cfg.eval.decay, match=cfg.eval.match, rank=0, world=1)
    t0 = time.time()
    res = reduce_metrics(v.sums(model), 1)
    took = time.time() - t0
    out = {"benchmark": "validation-chosen checkpoint scored once on test targets", "run": run.name,
           "config": args.config, "checkpoint": {"step": meta.get("step"), "validation": meta.get("validation")},
           "split": "test", "users": res["users"], "num_beams": args.beams or cfg.eval.num_beams,
           "metrics": res, "seconds": round(took, 1),
           "machine": {"platform": platform.platform(), "threads": args.threads}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    from grlm_ray.bench.common import portable  # no machine paths in a committed result
    (RESULTS / f"{args.out or f'test_{run.name}_best'}.json").write_text(json.dumps(portable(out), indent=1))
    print(json.dumps({k: out[k] for k in ("run", "users", "seconds")}), json.dumps(res))


if __name__ == "__main__":
    main()
