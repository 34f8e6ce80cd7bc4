"""Stage 4a — IIFT instruction data: GTI, sequence prediction and (optional) collaborative samples.

Contract: prepare/{items, sequences, targets} + a terms table (ctg / provided / compress K) ->
sft/sft.parquet (task, domain, prompt messages, completion) and sft/terms.parquet (the TIDs every later
stage uses: training, evaluation, serving).

The text of every sample is written by ``grlm_ray/lib/textformat.py`` (shared with evaluation and serving).
Held-out items (the valid/test target positions in prepare/targets) never appear in training samples,
neither as input nor as output; co-interaction neighbours are counted on training items only.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from grlm_ray.core.config import GrlmConfig, SFTConfig
from grlm_ray.core.errors import DataError
from grlm_ray.core.registry import reads, stage_key
from grlm_ray.core.schemas import ITEMS, SEQUENCES, SFT, TARGETS, TERMS
from grlm_ray.core.storage import StageContext, Store, run_stage
from grlm_ray.lib.termgen import repair
from grlm_ray.lib.terms import resolve_terms_table
from grlm_ray.lib.textformat import (
    PROMPT_VERSION,
    domain_lookup,
    gti_prompt,
    line_writer,
    messages,
    seq_prompt,
    tid_completion,
    training_sequences,
)

log = logging.getLogger(__name__)
STAGE = "sft"


def co_interaction_neighbors(train_seqs: dict[str, list[str]], top: int) -> dict[str, list[str]]:
    """Items adjacent in training sequences (both directions), most frequent first, ties by item id."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for items in train_seqs.values():
        for a, b in zip(items, items[1:]):
            if a != b:
                counts[a][b] += 1
                counts[b][a] += 1
    return {a: [b for b, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:top]] for a, c in counts.items()}


# --------------------------------------------------------------------------- builders
def build_samples(items: pa.Table, terms: dict[str, list[str]], train_seqs: dict[str, list[str]],
                  c: SFTConfig, domain_of) -> dict[str, list[dict[str, Any]]]:
    """All samples of every task with a weight (weights applied later), each {task, domain, prompt,
    completion}; a task of weight 0 is not built (the GTI prompts carry every item's description)."""
    ids = items.column("item_id").to_pylist()
    missing = [i for i in ids if i not in terms]
    if missing:
        raise DataError(f"{len(missing)} items have no TID in the chosen terms table (e.g. {missing[:3]}); "
                        "run CTG on every item (ctg.limit unset, or ctg.uncovered=words) or pick sft.terms")
    write = line_writer(c)
    lines = {i: write(terms[i], t) for i, t in zip(ids, items.column("title").to_pylist())}
    out: dict[str, list[dict[str, Any]]] = {"gti": [], "seq": [], "collab": []}
    if c.gti_weight > 0:
        for r in items.to_pylist():
            i = r["item_id"]
            out["gti"].append({"task": "gti", "domain": domain_of(i), "prompt": gti_prompt(r, c.max_item_chars, c.prompt),
                               "completion": tid_completion(terms[i])})
    for u in sorted(train_seqs):
        window = train_seqs[u][-c.max_history:]
        if len(window) < 2:
            continue  # nothing to predict from a single training item
        out["seq"].append({"task": "seq", "domain": domain_of(window[0]), "prompt": seq_prompt(lines[window[0]], c.prompt),
                           "completion": "\n".join(lines[i] for i in window[1:])})
    if c.collab_weight > 0:
        for a, nbrs in sorted(co_interaction_neighbors(train_seqs, c.collab_top).items()):
            out["collab"].append({"task": "collab", "domain": domain_of(a),
                                  "prompt": messages(c.prompt, "collab", line=lines[a]),
                                  "completion": "\n".join(lines[b] for b in nbrs)})
    return out


def mix(samples: dict[str, list[dict[str, Any]]], weights: dict[str, float], seed: int) -> list[dict[str, Any]]:
    """Weight w: floor(w) full copies plus a seeded (w - floor(w)) share; then one seeded shuffle."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    for task in sorted(samples):
        rows, w = samples[task], weights.get(task, 0.0)
        if not rows or w <= 0:
            continue
        whole = int(np.floor(w))
        for _ in range(whole):
            out.extend(rows)
        frac = w - whole
        if frac > 0:
            k = int(round(frac * len(rows)))
            out.extend(rows[j] for j in np.sort(rng.choice(len(rows), size=k, replace=False)))
    order = rng.permutation(len(out))
    return [out[j] for j in order]


def _fill_missing(items: pa.Table, terms_t: pa.Table) -> tuple[pa.Table, int]:
    """TIDs from their own words for items the terms table lacks; collisions re-resolved."""

    have = set(terms_t.column("item_id").to_pylist())
    rest = [r for r in items.to_pylist() if r["item_id"] not in have]
    if not rest:
        return terms_t, 0
    n = Counter(len(t) for t in terms_t.column("terms").to_pylist()).most_common(1)[0][0] if terms_t.num_rows else 5
    extra = pa.table({
        "item_id": pa.array([r["item_id"] for r in rest], pa.string()),
        "terms": pa.array([repair([], [r["title"], r["description"]], r["category"], n) for r in rest],
                          pa.list_(pa.string())),
        "raw": pa.array([""] * len(rest), pa.string()),
        "valid": pa.array([False] * len(rest), pa.bool_()),
        "source": pa.array(["words"] * len(rest), pa.string()),
    })
    base = terms_t.select(extra.column_names)
    return pa.concat_tables([base, extra.cast(base.schema)]), len(rest)


def terms_location(cfg: GrlmConfig) -> tuple[str, str]:
    """(stage, file) of the terms table named by ``sft.terms``."""
    c = cfg.sft
    if c.terms == "ctg":
        return "ctg", "terms.parquet"
    if c.terms == "provided":
        return "prepare", "terms.parquet"
    if c.compress_k not in cfg.compress.ks:
        raise DataError(f"sft.compress_k={c.compress_k} is not one of compress.ks={cfg.compress.ks}")
    return "compress", f"k{c.compress_k}/terms.parquet"


def sft(cfg: GrlmConfig) -> dict[str, Any]:
    store = Store(cfg.run.root, cfg.run.s3)
    c = cfg.sft
    src_stage, src_file = terms_location(cfg)

    def body(ctx: StageContext) -> None:
        items = ctx.read("items.parquet", ITEMS, stage="prepare")
        seqs = ctx.read("sequences.parquet", SEQUENCES, stage="prepare")
        targets = ctx.read("targets.parquet", TARGETS, stage="prepare")
        terms_t = ctx.read(src_file, TERMS, stage=src_stage)
        filled = 0
        if c.missing_terms == "words":
            terms_t, filled = _fill_missing(items, terms_t)
        collisions = None
        if c.resolve_collisions:
            terms_t, report = resolve_terms_table(terms_t, items)
            collisions = report.as_dict()
        terms = dict(zip(terms_t.column("item_id").to_pylist(), terms_t.column("terms").to_pylist()))
        train_seqs = training_sequences(seqs, targets)
        samples = build_samples(items, terms, train_seqs, c, domain_lookup(cfg))
        mixed = mix(samples, {"gti": c.gti_weight, "seq": c.seq_weight, "collab": c.collab_weight}, c.seed)
        table = pa.table({f.name: pa.array([r[f.name] for r in mixed], f.type) for f in SFT.arrow}, schema=SFT.arrow)
        ctx.write("sft.parquet", table, SFT)
        import pyarrow.compute as pc

        ctx.write("terms.parquet", terms_t.filter(pc.is_in(terms_t.column("item_id"), value_set=items.column("item_id").combine_chunks())),
                  TERMS)
        per_task = Counter(r["task"] for r in mixed)
        ctx.info.update({
            "prompt_version": PROMPT_VERSION, "terms_source": f"{src_stage}/{src_file}",
            "items_named_from_words": filled, "collisions": collisions,
            "samples": dict(per_task), "natural_samples": {k: len(v) for k, v in samples.items()} | (
                {"gti": items.num_rows} if c.gti_weight <= 0 else {}),
            "per_domain": dict(Counter(r["domain"] for r in mixed)),
            "users_without_seq_sample": sum(1 for v in train_seqs.values() if len(v[-c.max_history:]) < 2),
            "example": {t: samples[t][0] for t in samples if samples[t]},
        })

    return run_stage(store, cfg.run.name, STAGE, stage_key(cfg, STAGE, PROMPT_VERSION), body, resume=cfg.run.resume, after=reads(STAGE, cfg),
                     inputs={"terms": store.uri(f"{cfg.run.name}/{src_stage}/{src_file}")})


