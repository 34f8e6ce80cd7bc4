"""Score a run's best checkpoint (``train/best``, chosen on validation) once on the TEST targets of every
user (or a seeded sample), in one process, with the training-time validator: the evaluation's own prompts,
constrained beam search, EIG and metric code. For a run whose training was stopped before its stage
finished (no exported model yet), so its validation-chosen checkpoint can still be scored.

    python benchmarks/isolation/score_best_on_test.py CONFIG [--users N] [--threads 2] [--out NAME]
        [--ensemble 'CONFIG2 key=value ...' ...] [--split valid]

``--ensemble``: other runs (a config and its overrides, e.g. another seed) whose best checkpoints decode with
this one as one model (their next-token log-probs averaged: ``eval.ensemble``'s ``LogProbEnsemble``).
``--split valid``: the training's own validation users instead (``train.validation``: choose on these, then
score the test split once). Writes benchmarks/results/<NAME>.json (default test_<run>_best.json).
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
    ap.add_argument("--set", nargs="*", default=[], help="overrides of CONFIG (key=value)")
    ap.add_argument("--ensemble", nargs="*", default=[], metavar="'CONFIG key=value ...'",
                    help="more runs whose best checkpoints decode with this one as one model")
    ap.add_argument("--split", choices=["test", "valid"], default="test")
    args = ap.parse_args()

    import pyarrow as pa
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grlm_ray.core.config import load_config
    from grlm_ray.lib.protocol import build_queries
    from grlm_ray.core.run import Run
    from grlm_ray.lib.validation import Validator, build_validation_set, reduce_metrics

    torch.set_num_threads(args.threads)

    def best_model(cfg):
        run = Run.of(cfg)
        base, best = run.path("train", "base"), run.path("train", "best")
        meta = json.load(open(Path(best) / "meta.json"))
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        state = torch.load(Path(best) / "model.pt", map_location="cpu")
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        model.load_state_dict(state, strict=False)
        return run, AutoTokenizer.from_pretrained(base), model.eval(), meta

    cfg = load_config(args.config, list(args.set))
    run, tok, model, meta = best_model(cfg)
    items = run.read_table("prepare", "items.parquet")
    seqs = run.read_table("prepare", "sequences.parquet")
    targets = run.read_table("prepare", "targets.parquet")
    terms_t = run.read_table("sft", "terms.parquet")
    members = [{"run": run.name, "step": meta.get("step"), "validation": meta.get("validation")}]
    if args.ensemble:
        from grlm_ray.lib.decoding import LogProbEnsemble

        models = [model]
        for spec in args.ensemble:
            path, *over = spec.split()
            orun, otok, omodel, ometa = best_model(load_config(path, over))
            if otok.get_vocab() != tok.get_vocab():
                raise SystemExit(f"--ensemble {spec!r}: its tokenizer differs from {run.name}'s")
            models.append(omodel)
            members.append({"run": orun.name, "step": ometa.get("step"), "validation": ometa.get("validation")})
        model = LogProbEnsemble(models)
    valid_q, catalog = build_validation_set(cfg, items, seqs, targets, terms_t, tok)
    if args.split == "valid":
        qt = valid_q
    else:
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
    out = {"benchmark": "validation-chosen checkpoint scored once on test targets" if args.split == "test"
           else "validation-chosen checkpoint on the training's validation users", "run": run.name,
           "config": args.config, "overrides": list(args.set),
           "checkpoint": {"step": meta.get("step"), "validation": meta.get("validation")},
           "ensemble": members if args.ensemble else None, "split": args.split, "users": res["users"],
           "num_beams": args.beams or cfg.eval.num_beams,
           "metrics": res, "seconds": round(took, 1),
           "machine": {"platform": platform.platform(), "threads": args.threads}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    from grlm_ray.bench.common import portable  # no machine paths in a committed result
    (RESULTS / f"{args.out or f'{args.split}_{run.name}_best'}.json").write_text(json.dumps(portable(out), indent=1))
    print(json.dumps({k: out[k] for k in ("run", "users", "seconds")}), json.dumps(res))


if __name__ == "__main__":
    main()
