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
from collections import Counter
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from grlm_ray.core.config import GrlmConfig, SFTConfig
from grlm_ray.core.errors import DataError
from grlm_ray.core.registry import reads, stage_key
from grlm_ray.core.schemas import ITEMS, SEQUENCES, SFT, TARGETS, TERMS
from grlm_ray.core.storage import StageContext, Store, release_arrow_memory, run_stage
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
    """Items adjacent in training sequences (both directions), most frequent first, ties by item id.
    Counted on integer codes with numpy (a Counter per item took ~1 KB each: a GB at 1M items)."""
    vocab = sorted({i for items in train_seqs.values() for i in items})  # code order = item id order
    code = {i: k for k, i in enumerate(vocab)}
    flat = np.fromiter((code[i] for items in train_seqs.values() for i in items), np.int64)
    owner = np.repeat(np.arange(len(train_seqs)), [len(v) for v in train_seqs.values()])
    nxt = (owner[1:] == owner[:-1]) & (flat[1:] != flat[:-1])
    a, b = flat[:-1][nxt], flat[1:][nxt]
    a, b = np.concatenate([a, b]), np.concatenate([b, a])
    pairs, counts = np.unique(a * max(len(vocab), 1) + b, return_counts=True)
    a, b = pairs // max(len(vocab), 1), pairs % max(len(vocab), 1)
    order = np.lexsort((b, -counts, a))  # by item, then most frequent, then neighbour id
    a, b = a[order], b[order]
    first = np.searchsorted(a, a, side="left")
    keep = np.arange(len(a)) - first < top
    out: dict[str, list[str]] = {}
    for x, y in zip(a[keep].tolist(), b[keep].tolist()):
        out.setdefault(vocab[x], []).append(vocab[y])
    return out


# --------------------------------------------------------------------------- builders
def _sample_rows(items: pa.Table, terms: dict[str, list[str]], train_seqs: dict[str, list[str]], c: SFTConfig,
                 domain_of, task: str) -> Iterator[dict[str, Any]]:
    write = line_writer(c)
    if task == "gti":
        for b in items.to_batches(max_chunksize=8192):
            for r in b.to_pylist():
                i = r["item_id"]
                yield {"task": "gti", "domain": domain_of(i), "prompt": gti_prompt(r, c.max_item_chars, c.prompt),
                       "completion": tid_completion(terms[i])}
        return
    titles = dict(zip(items.column("item_id").to_pylist(), items.column("title").to_pylist()))
    lines: dict[str, str] = {}

    def line(i: str) -> str:
        if i not in lines:
            lines[i] = write(terms[i], titles[i])
        return lines[i]

    if task == "seq":
        for u in sorted(train_seqs):
            window = train_seqs[u][-c.max_history:]
            if len(window) < 2:
                continue  # nothing to predict from a single training item
            yield {"task": "seq", "domain": domain_of(window[0]), "prompt": seq_prompt(line(window[0]), c.prompt),
                   "completion": "\n".join(line(i) for i in window[1:])}
    elif task == "collab":
        for a, nbrs in sorted(co_interaction_neighbors(train_seqs, c.collab_top).items()):
            yield {"task": "collab", "domain": domain_of(a), "prompt": messages(c.prompt, "collab", line=line(a)),
                   "completion": "\n".join(line(b) for b in nbrs)}


def sample_tables(items: pa.Table, terms: dict[str, list[str]], train_seqs: dict[str, list[str]],
                  c: SFTConfig, domain_of, chunk: int = 8192) -> dict[str, pa.Table]:
    """Every task's samples (``SFT`` rows, weights applied later) as an Arrow table, built ``chunk`` rows at
    a time: Python objects exist for one chunk only. A task of weight 0 is not built (the GTI prompts carry
    every item's description)."""
    ids = items.column("item_id").to_pylist()
    missing = [i for i in ids if i not in terms]
    if missing:
        raise DataError(f"{len(missing)} items have no TID in the chosen terms table (e.g. {missing[:3]}); "
                        "run CTG on every item (ctg.limit unset, or ctg.uncovered=words) or pick sft.terms")
    del ids
    out: dict[str, pa.Table] = {}
    for task, w in (("gti", c.gti_weight), ("seq", 1.0), ("collab", c.collab_weight)):
        parts, rows = [], []
        for r in _sample_rows(items, terms, train_seqs, c, domain_of, task) if w > 0 else ():
            rows.append(r)
            if len(rows) >= chunk:
                parts.append(pa.Table.from_pylist(rows, schema=SFT.arrow))
                rows = []
        parts.append(pa.Table.from_pylist(rows, schema=SFT.arrow))
        out[task] = pa.concat_tables(parts)  # left in its chunks: one copy of the samples, not two
    return out


def build_samples(items: pa.Table, terms: dict[str, list[str]], train_seqs: dict[str, list[str]],
                  c: SFTConfig, domain_of) -> dict[str, list[dict[str, Any]]]:
    """``sample_tables`` as row dicts, each {task, domain, prompt, completion}."""
    return {k: t.to_pylist() for k, t in sample_tables(items, terms, train_seqs, c, domain_of).items()}


def mix_order(sizes: dict[str, int], weights: dict[str, float], seed: int) -> list[tuple[str, np.ndarray]]:
    """Which rows of each task, in which order: weight w gives floor(w) full copies plus a seeded
    (w - floor(w)) share; then one seeded shuffle. Returns (task, row) pairs as parallel arrays."""
    rng = np.random.default_rng(seed)
    tasks, rows = [], []
    for k, task in enumerate(sorted(sizes)):
        n, w = sizes[task], weights.get(task, 0.0)
        if not n or w <= 0:
            continue
        whole = int(np.floor(w))
        picked = [np.arange(n)] * whole
        frac = w - whole
        if frac > 0:
            picked.append(np.sort(rng.choice(n, size=int(round(frac * n)), replace=False)))
        for p in picked:
            tasks.append(np.full(len(p), k))
            rows.append(p)
    task_of = np.concatenate(tasks) if tasks else np.zeros(0, np.int64)
    row_of = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    order = rng.permutation(len(task_of))
    names = sorted(sizes)
    return [(names[t], r) for t, r in zip(task_of[order].tolist(), row_of[order].tolist())]


def mix(samples: dict[str, list[dict[str, Any]]], weights: dict[str, float], seed: int) -> list[dict[str, Any]]:
    """The mixture of row lists (``mix_order``)."""
    return [samples[t][r] for t, r in mix_order({k: len(v) for k, v in samples.items()}, weights, seed)]


def mix_batches(tables: dict[str, pa.Table], weights: dict[str, float], seed: int,
                rows: int = 65536) -> Iterator[pa.Table]:
    """The mixture of Arrow tables (``mix_order``: the same rows in the same order as ``mix``), ``rows`` at
    a time: written as it is gathered, the mixed copy of every sample is never whole in memory."""
    names = sorted(tables)
    order = mix_order({k: tables[k].num_rows for k in names}, weights, seed)
    start = np.cumsum([0] + [tables[k].num_rows for k in names])
    pos = {k: start[j] for j, k in enumerate(names)}
    whole = pa.concat_tables([tables[k].cast(SFT.arrow) for k in names])
    at = np.fromiter((pos[t] + r for t, r in order), np.int64, len(order))
    del order
    if not len(at):
        yield SFT.arrow.empty_table()
    for s in range(0, len(at), rows):
        yield whole.take(pa.array(at[s:s + rows]))


def mix_tables(tables: dict[str, pa.Table], weights: dict[str, float], seed: int) -> pa.Table:
    """``mix_batches`` as one table."""
    return pa.concat_tables([SFT.arrow.empty_table(), *mix_batches(tables, weights, seed)])


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
        import pyarrow.compute as pc

        ctx.write("terms.parquet", terms_t.filter(pc.is_in(terms_t.column("item_id"), value_set=items.column("item_id").combine_chunks())),
                  TERMS)
        terms = dict(zip(terms_t.column("item_id").to_pylist(), terms_t.column("terms").to_pylist()))
        del terms_t
        train_seqs = training_sequences(seqs, targets)
        del seqs, targets
        release_arrow_memory()
        n_items = items.num_rows
        if c.gti_weight <= 0:  # the descriptions are read by the GTI prompts only
            items = items.select(["item_id", "title"])
        samples = sample_tables(items, terms, train_seqs, c, domain_lookup(cfg))
        del items, terms
        tasks: Counter[str] = Counter()
        domains: Counter[str] = Counter()

        def counted(tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
            for t in tables:
                for col, into in (("task", tasks), ("domain", domains)):
                    vc = pc.value_counts(t.column(col))
                    into.update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))
                yield t

        ctx.write_batches("sft.parquet", counted(mix_batches(
            samples, {"gti": c.gti_weight, "seq": c.seq_weight, "collab": c.collab_weight}, c.seed)), SFT)
        ctx.info.update({
            "prompt_version": PROMPT_VERSION, "terms_source": f"{src_stage}/{src_file}",
            "items_named_from_words": filled, "collisions": collisions,
            "samples": dict(tasks), "natural_samples": {k: v.num_rows for k, v in samples.items()} | (
                {"gti": n_items} if c.gti_weight <= 0 else {}),
            "per_domain": dict(domains),
            "users_without_seq_sample": sum(1 for v in train_seqs.values() if len(v[-c.max_history:]) < 2),
            "example": {t: samples[t].slice(0, 1).to_pylist()[0] for t in samples if samples[t].num_rows},
        })

    return run_stage(store, cfg.run.name, STAGE, stage_key(cfg, STAGE, PROMPT_VERSION), body, resume=cfg.run.resume, after=reads(STAGE, cfg),
                     inputs={"terms": store.uri(f"{cfg.run.name}/{src_stage}/{src_file}")})


