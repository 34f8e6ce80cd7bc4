"""`grlm diagnose CONFIG`: what a trained model learned, and whether evaluation asks it what it was taught.

Four measurements on a finished ``train`` stage (written to ``train/diagnostics.json`` and MLflow):

- **alignment**: for real users, the tokens evaluation feeds the model (the rendered history prompt,
  built by ``protocol.build_queries``) followed by the trie's tokens of the next item's TID must be
  exactly a prefix of that user's training sample tokens (same chat-template tokens, positions, history
  window); and a left-padded batch (as evaluation pads) must give the same next-token log-probs as each
  prompt alone (position ids follow the padding).
- **tokens per TID** under the model's tokenizer (the number of decoding steps per item).
- **loss by token kind** on a seeded sample of training rows: TID tokens, the `` |`` end marker, title
  tokens, line breaks, end of turn (prompt tokens carry no loss).
- **per-position term accuracy** on validation users, teacher-forced: the share of users whose j-th TID
  term (all of its tokens) is the model's top choice given the true history and the true earlier terms.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import numpy as np

from grlm_ray.core.config import GrlmConfig
from grlm_ray.core.schemas import ITEMS, SEQUENCES, SFT, TARGETS, TERMS
from grlm_ray.core.run import Run
from grlm_ray.core.tracking import log_diagnostics
from grlm_ray.lib.decoding import END_MARKER, TransformersScorer, tid_token_seqs
from grlm_ray.lib.eig import tid_text
from grlm_ray.lib.models import load_tokenizer, quiet_loading
from grlm_ray.lib.protocol import build_queries
from grlm_ray.lib.textformat import history_prompt, line_writer, seq_prompt, training_sequences
from grlm_ray.lib.tokens import encode_all, end_of_turn, render_prompt
from grlm_ray.lib.vocab import tokens_per_tid


def token_kinds(completion: str, offsets: list[tuple[int, int]], n_tokens: int) -> list[str]:
    """Kind of each completion token: tid / end / title / newline / eot (tokens past the text)."""

    kinds = []
    starts = []  # (start, end, kind) character ranges of the completion
    pos = 0
    for line in completion.split("\n"):
        cut = line.find(END_MARKER)
        if cut < 0:
            starts.append((pos, pos + len(line), "tid"))
        else:
            starts.append((pos, pos + cut, "tid"))
            starts.append((pos + cut, pos + cut + len(END_MARKER), "end"))
            starts.append((pos + cut + len(END_MARKER), pos + len(line), "title"))
        starts.append((pos + len(line), pos + len(line) + 1, "newline"))
        pos += len(line) + 1
    for j in range(n_tokens):
        if j >= len(offsets) or offsets[j][0] >= len(completion):
            kinds.append("eot")
            continue
        a = offsets[j][0]
        kinds.append(next((k for s, e, k in starts if s <= a < e), "newline"))
    return kinds


def loss_by_kind(model: Any, tokenizer: Any, sft_rows: list[dict[str, Any]], enable_thinking: bool) -> dict[str, Any]:
    import torch

    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    eot = end_of_turn(tokenizer)
    with torch.inference_mode():
        for r in sft_rows:
            p = tokenizer(render_prompt(tokenizer, r["prompt"], enable_thinking), add_special_tokens=False)["input_ids"]
            enc = tokenizer(r["completion"] + eot, add_special_tokens=False, return_offsets_mapping=True)
            c = enc["input_ids"]
            ids = torch.tensor([p + c])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1:-1].float(), dim=-1)
            nll = -logp[torch.arange(len(c)), torch.tensor(c)]
            for kind, x in zip(token_kinds(r["completion"], enc["offset_mapping"], len(c)), nll.tolist()):
                key = f"{r['task']}/{kind}"
                sums[key][0] += x
                sums[key][1] += 1
    return {k: {"mean_loss": round(s / n, 4), "tokens": n} for k, (s, n) in sorted(sums.items())}


def alignment(cfg: GrlmConfig, tokenizer: Any, model: Any, items: Any, seqs: Any, targets: Any,
              terms: dict[str, list[str]], sft_table: Any, users: int) -> dict[str, Any]:
    """Evaluation's prompt + the target TID's trie tokens vs the training sample, token by token."""
    import torch

    train_seqs = training_sequences(seqs, targets)
    vcfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"split": "valid", "limit_users": users})})
    queries = build_queries(vcfg, items, seqs, targets, terms, tokenizer)
    seq_rows = [r for r in sft_table.to_pylist() if r["task"] == "seq"]
    samples = {}  # a training sample is identified by its prompt (the first item) + completion
    for r in seq_rows:
        samples.setdefault((r["prompt"][-1]["content"], r["completion"]), r)
    write = line_writer(cfg.sft)
    titles = dict(zip(items.column("item_id").to_pylist(), items.column("title").to_pylist()))
    checked = matched = 0
    mismatches = []
    for q in queries:
        window = train_seqs[q["user_id"]][-cfg.sft.max_history:]
        if len(window) < 2 or len(q["history"]) < 2:
            continue
        # the validation target follows the whole training sequence; predicting its last training item
        # from the items before it is the prefix of the training sample
        completion = "\n".join(write(terms[i], titles.get(i, "")) for i in window[1:])
        first = seq_prompt(write(terms[window[0]], titles.get(window[0], "")), cfg.sft.prompt)[-1]["content"]
        sample = samples.get((first, completion))
        if sample is None:
            continue
        ids, _ = encode_all(tokenizer, [sample["prompt"]], [sample["completion"]], cfg.model.enable_thinking)
        hist = window[:-1]
        msgs, prefix = history_prompt([write(terms[i], titles.get(i, "")) for i in hist], cfg.sft.max_history,
                                      cfg.sft.prompt)
        prompt_ids = tokenizer(render_prompt(tokenizer, msgs, cfg.model.enable_thinking, prefix),
                               add_special_tokens=False)["input_ids"]
        want = prompt_ids + tid_token_seqs(tokenizer, [tid_text(terms[window[-1]])])[0]
        checked += 1
        if ids[0][:len(want)] == want:
            matched += 1
        elif len(mismatches) < 3:
            k = next(j for j, (a, b) in enumerate(zip(ids[0], want)) if a != b) if any(
                a != b for a, b in zip(ids[0], want)) else min(len(ids[0]), len(want))
            mismatches.append({"user_id": q["user_id"], "first_difference_at": k,
                               "training": tokenizer.convert_ids_to_tokens(ids[0][max(0, k - 3):k + 3]),
                               "evaluation": tokenizer.convert_ids_to_tokens(want[max(0, k - 3):k + 3])})
        if checked >= users:
            break
    # left padding: a batch of different lengths scores each prompt as it scores it alone
    prompts = [q["prompt"] for q in queries[:8]]
    scorer = TransformersScorer(model, tokenizer)
    model.config.use_cache = True
    with torch.inference_mode():
        tok_b, lp_b = scorer.start(prompts, None, 5)
        diffs = []
        for j, p in enumerate(prompts):
            tok_1, lp_1 = scorer.start([p], None, 5)
            diffs.append(float(np.abs(lp_1[0] - lp_b[j]).max()) if (tok_1[0] == tok_b[j]).all() else float("inf"))
    return {"users_checked": checked, "training_prefix_matches": matched, "mismatches": mismatches,
            "left_padding_max_logprob_diff": max(diffs) if diffs else None,
            "prompt_lengths": sorted({len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts})}


def term_accuracy(cfg: GrlmConfig, tokenizer: Any, model: Any, queries: list[dict[str, Any]],
                  terms: dict[str, list[str]]) -> dict[str, Any]:
    """Teacher-forced top-1 accuracy of each TID term position on validation targets."""
    import torch

    hits = np.zeros(cfg.ctg.num_terms + 1)
    whole = 0
    n = 0
    with torch.inference_mode():
        for q in queries:
            tid = terms[q["target_item_id"]]
            p = tokenizer(q["prompt"], add_special_tokens=False)["input_ids"]
            pieces, text = [], ""
            for j, w in enumerate(tid):  # tokens of each term as they appear in the TID text
                before = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
                text = (text + " " if text else "") + w
                after = tokenizer(text, add_special_tokens=False)["input_ids"]
                pieces.append((len(before), len(after)))
            full = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p + full])
            pred = model(input_ids=ids).logits[0, len(p) - 1:-1].argmax(-1).tolist()
            ok_all = True
            for j, (a, b) in enumerate(pieces):
                ok = all(pred[x] == full[x] for x in range(a, b))
                hits[j] += ok
                ok_all &= ok
            whole += ok_all
            n += 1
    return {"users": n, "per_position": [round(float(h) / max(1, n), 4) for h in hits[:cfg.ctg.num_terms]],
            "whole_tid": round(float(whole) / max(1, n), 4)}


def diagnose(cfg: GrlmConfig, users: int = 300, rows: int = 400) -> dict[str, Any]:
    quiet_loading()
    import torch
    from transformers import AutoModelForCausalLM

    run = Run.of(cfg)
    if not run.exists("train", "model/config.json"):
        raise FileNotFoundError(f"no trained model under {run.uri('train', 'model')}: run grlm train first")
    model_dir = run.local_dir("train", "model", os.path.expanduser("~/.cache/grlm-ray/diagnose"))
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    items = run.read_table("prepare", "items.parquet", ITEMS)
    seqs = run.read_table("prepare", "sequences.parquet", SEQUENCES)
    targets = run.read_table("prepare", "targets.parquet", TARGETS)
    terms_t = run.read_table("sft", "terms.parquet", TERMS)
    sft_table = run.read_table("sft", "sft.parquet", SFT)
    terms = dict(zip(terms_t.column("item_id").to_pylist(), terms_t.column("terms").to_pylist()))
    rng = np.random.default_rng(0)
    sample = sft_table.take(np.sort(rng.choice(sft_table.num_rows, size=min(rows, sft_table.num_rows),
                                               replace=False))).to_pylist()
    vcfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"split": "valid", "limit_users": users})})
    queries = build_queries(vcfg, items, seqs, targets, terms, tok)
    report = {
        "model_dir": run.uri("train", "model"),
        "format": {"item_text": cfg.sft.item_text, "prompt": cfg.sft.prompt, "vocab": cfg.model.vocab,
                   "vocab_size": len(tok)},
        "tokens_per_tid": tokens_per_tid(tok, [tid_text(t) for t in terms.values()]),
        "alignment": alignment(cfg, tok, model, items, seqs, targets, terms, sft_table, min(users, 200)),
        "loss_by_kind": loss_by_kind(model, tok, sample, cfg.model.enable_thinking),
        "term_accuracy": term_accuracy(cfg, tok, model, queries, terms),
    }
    run.write_json("train", "diagnostics.json", report)
    if cfg.tracking.enabled:
        log_diagnostics(cfg, report)
    return report


def format_report(r: dict[str, Any]) -> str:
    a, ta = r["alignment"], r["term_accuracy"]
    lines = [f"model        {r['model_dir']}",
             f"format       item_text={r['format']['item_text']} prompt={r['format']['prompt']} "
             f"vocab={r['format']['vocab']} ({r['format']['vocab_size']:,} tokens)",
             f"tokens/TID   mean {r['tokens_per_tid']['mean']} max {r['tokens_per_tid']['max']}",
             f"alignment    {a['training_prefix_matches']}/{a['users_checked']} evaluation prompts + target TID are "
             f"a prefix of the training sample; left padding max |d logprob| {a['left_padding_max_logprob_diff']:.2e}",
             "loss by kind " + ", ".join(f"{k} {v['mean_loss']:.3f} ({v['tokens']})" for k, v in r["loss_by_kind"].items()),
             f"term acc.    per position {ta['per_position']}, whole TID {ta['whole_tid']} ({ta['users']} valid users, "
             "teacher-forced top-1)"]
    for m in a["mismatches"]:
        lines.append(f"  mismatch user {m['user_id']} at token {m['first_difference_at']}: training {m['training']} "
                     f"vs evaluation {m['evaluation']}")
    return "\n".join(lines)
