"""Beam search cost: trie-constrained vs unconstrained, batched vs one user at a time, and our beam loop
(one prefill per batch, cache copied per beam, finished users leave the batch) vs transformers'
``generate`` beam search (prompt run once per beam; same results, see tests/test_decoding.py).

    grlm demo && grlm bench decoding --root runs --users 48

Uses the demo run's trained model (the pipeline up to training is run first; finished stages are
skipped). Same users, same model, 20 beams, 30 new tokens, one process, side by side in one run.
Writes benchmarks/results/decoding.json with the machine description and prints a table.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from grlm_ray.bench.common import REPO, ratio


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="a run with a trained model")
    ap.add_argument("--root", default="runs")
    ap.add_argument("--users", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-pipeline", action="store_true",
                    help="use the run's finished outputs as they are (no stage is run or checked; no Ray, no MLflow)")
    ap.add_argument("--no-reference", action="store_true", help="skip transformers' generate (slow)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from grlm_ray.core.config import load_config
    from grlm_ray.flows.pipeline import run_pipeline, upstream
    from grlm_ray.core.schemas import ITEMS, SEQUENCES, TARGETS, TERMS
    from grlm_ray.core.run import Run
    from grlm_ray.lib.decoding import END_MARKER, TidTrie, beam_search, tid_token_seqs
    from grlm_ray.lib.eig import tid_text
    from grlm_ray.lib.models import load_tokenizer
    from grlm_ray.lib.protocol import build_queries

    cfg = load_config(args.config, [f"run.root={args.root}", "ray.progress_bars=false",
                                    f"eval.limit_users={args.users}"])
    if not args.no_pipeline:
        run_pipeline(cfg, stages=upstream("train", cfg))
    run = Run.of(cfg)
    rd = run.read_table
    terms_t = rd("sft", "terms.parquet", TERMS)
    terms = dict(zip(terms_t.column("item_id").to_pylist(), terms_t.column("terms").to_pylist()))
    model_dir = run.path("train", "model")
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    queries = build_queries(cfg, rd("prepare", "items.parquet", ITEMS), rd("prepare", "sequences.parquet", SEQUENCES),
                            rd("prepare", "targets.parquet", TARGETS), terms, tok)
    # the eval stage batches users of similar prompt length together; do the same here
    prompts = sorted((q["prompt"] for q in queries), key=lambda p: len(tok(p)["input_ids"]))
    end = tok(END_MARKER, add_special_tokens=False)["input_ids"][0]
    trie = TidTrie.build(tid_token_seqs(tok, [tid_text(t) for t in terms.values()]), end)

    def timed(batch: int, constrained: bool) -> tuple[float, list[list[str]]]:
        beam_search(model, tok, prompts[:batch], num_beams=args.beams, max_new_tokens=30,
                    trie=trie if constrained else None, batch_size=batch, stop_token_ids=[end, tok.eos_token_id])
        t = time.perf_counter()  # after one warm-up batch
        out = beam_search(model, tok, prompts, num_beams=args.beams, max_new_tokens=30,
                          trie=trie if constrained else None, batch_size=batch, stop_token_ids=[end, tok.eos_token_id])
        sync()
        return time.perf_counter() - t, out

    def sync() -> None:
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    def reference(batch: int, constrained: bool) -> tuple[float, list[list[str]]]:
        tok.padding_side = "left"
        t, out = time.perf_counter(), []
        for s in range(0, len(prompts), batch):
            enc = tok(prompts[s:s + batch], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            plen = enc["input_ids"].shape[1]
            kw = {"prefix_allowed_tokens_fn": lambda b, ids: trie.allowed(ids[plen:].tolist())} if constrained else {}
            with torch.inference_mode():
                gen = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                     num_beams=args.beams, num_return_sequences=args.beams, do_sample=False,
                                     max_new_tokens=30, early_stopping=True, pad_token_id=tok.pad_token_id,
                                     eos_token_id=[end, tok.eos_token_id], temperature=None, top_p=None, top_k=None,
                                     **kw)
            texts = tok.batch_decode(gen[:, plen:], skip_special_tokens=True)
            out += [list(dict.fromkeys(x.strip() for x in texts[i * args.beams:(i + 1) * args.beams]))
                    for i in range(len(prompts[s:s + batch]))]
        return time.perf_counter() - t, out

    rows = []
    settings = [("batched, unconstrained", args.batch, False, timed), ("batched, constrained", args.batch, True, timed),
                ("one user at a time, constrained", 1, True, timed)]
    if not args.no_reference:
        settings += [("transformers generate, batched, constrained", args.batch, True, reference),
                     ("transformers generate, one at a time, constrained", 1, True, reference)]
    for name, batch, constrained, fn in settings:
        secs, out = fn(batch, constrained)
        rows.append({"setting": name, "batch": batch, "constrained": constrained, "seconds": round(secs, 3),
                     "users_per_s": round(len(prompts) / secs, 3), "mean_beams": sum(map(len, out)) / len(out)})
    ratios = {"constrained_vs_unconstrained_time": ratio(rows[1]["seconds"], rows[0]["seconds"]),
              "batched_vs_one_at_a_time_speedup": ratio(rows[2]["seconds"], rows[1]["seconds"]),
              "ours_batched_vs_generate_one_at_a_time_speedup":
                  ratio(rows[4]["seconds"], rows[1]["seconds"]) if len(rows) > 4 else None,
              "ours_vs_generate_batched_speedup": ratio(rows[3]["seconds"], rows[1]["seconds"]) if len(rows) > 3 else None}
    return {"users": len(prompts), "beams": args.beams, "max_new_tokens": 30, "config": str(args.config),
            "device": args.device, "dtype": args.dtype, "batch": args.batch,
            "model": f"{cfg.run.name} run's trained model", "rows": rows, "ratios": ratios,
            "goals": {"constrained_vs_unconstrained_time": "<= 1.3", "batched_vs_one_at_a_time_speedup": ">= 5"}}
