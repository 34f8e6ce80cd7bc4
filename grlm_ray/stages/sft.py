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
import pyarrow.compute as pc

from grlm_ray.core.config import GrlmConfig, SFTConfig
from grlm_ray.core.errors import DataError
from grlm_ray.core.registry import stage_key
from grlm_ray.core.schemas import ITEMS, MESSAGE, SEQUENCES, SFT, TARGETS, TERMS
from grlm_ray.core.run import Run
from grlm_ray.core.storage import StageContext, release_arrow_memory, take_rows
from grlm_ray.lib.termgen import repair
from grlm_ray.lib.terms import keep_provided, resolve_terms_table
from grlm_ray.lib.textformat import (
    PROMPT_VERSION,
    PROMPTS,
    domain_lookup,
    gti_prompt,
    line_writer,
    tid_completion,
    training_lists,
)

log = logging.getLogger(__name__)
STAGE = "sft"


def co_interaction_pairs(codes: np.ndarray, owner: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Items adjacent in training sequences (both directions) as code pairs (a, b): a ascending, then b most
    frequent first, ties by code; at most ``top`` per a. ``codes`` is every training interaction, ``owner``
    its sequence. Integer codes and numpy only (a Counter per item took ~1 KB each: a GB at 1M items)."""
    codes, owner = np.asarray(codes, np.int64), np.asarray(owner, np.int64)
    m = max(int(codes.max()) + 1, 1) if len(codes) else 1
    nxt = (owner[1:] == owner[:-1]) & (codes[1:] != codes[:-1])
    a, b = codes[:-1][nxt], codes[1:][nxt]
    a, b = np.concatenate([a, b]), np.concatenate([b, a])
    pairs, counts = np.unique(a * m + b, return_counts=True)
    a, b = pairs // m, pairs % m
    order = np.lexsort((b, -counts, a))  # by item, then most frequent, then neighbour code
    a, b = a[order], b[order]
    keep = np.arange(len(a)) - np.searchsorted(a, a, side="left") < top
    return a[keep], b[keep]


def co_interaction_neighbors(train_seqs: dict[str, list[str]], top: int) -> dict[str, list[str]]:
    """``co_interaction_pairs`` by item id: {item: neighbours, most frequent first, ties by item id}."""
    vocab = sorted({i for items in train_seqs.values() for i in items})  # code order = item id order
    code = {i: k for k, i in enumerate(vocab)}
    flat = np.fromiter((code[i] for items in train_seqs.values() for i in items), np.int64)
    owner = np.repeat(np.arange(len(train_seqs)), [len(v) for v in train_seqs.values()])
    out: dict[str, list[str]] = {}
    for x, y in zip(*(v.tolist() for v in co_interaction_pairs(flat, owner, top))):
        out.setdefault(vocab[x], []).append(vocab[y])
    return out


# --------------------------------------------------------------------------- builders
def _train_arrays(train: Any) -> tuple[pa.Array, pa.ListArray]:
    """(user ids, each user's training items) from a {user: items} dict or from those two arrays."""
    if isinstance(train, dict):
        return pa.array(list(train), pa.string()), pa.array(list(train.values()), pa.list_(pa.string()))
    users, lists = train
    return users, lists


def _aligned_terms(items: pa.Table, terms: Any) -> pa.Array:
    """Each catalog item's TID in ``items`` order, from a terms table or a {item: terms} mapping."""
    if not isinstance(terms, pa.Table):
        terms = pa.table({"item_id": pa.array(list(terms), pa.string()),
                          "terms": pa.array(list(terms.values()), pa.list_(pa.string()))})
    ids = items.column("item_id")
    at = pc.index_in(ids, value_set=terms.column("item_id"))
    missing = ids.filter(pc.is_null(at)).to_pylist()
    if missing:
        raise DataError(f"{len(missing)} items have no TID in the chosen terms table (e.g. {missing[:3]}); "
                        "run CTG on every item (ctg.limit unset, or ctg.uncovered=words) or pick sft.terms")
    tids = terms.column("terms").take(at)
    return tids.combine_chunks() if isinstance(tids, pa.ChunkedArray) else tids


def _messages(style: str, task: str, lines: pa.Array) -> pa.ListArray:
    """``messages(style, task, line=...)`` for a column of lines: [system, user] per row, built in Arrow."""
    p = PROMPTS[style]
    before, after = p[task].format(line="\0").split("\0")
    user = pc.binary_join_element_wise(pa.scalar(before), lines, pa.scalar(after), "")
    n = len(lines)
    texts = pa.concat_arrays([pa.array([p["system"]], pa.string()), user.cast(pa.string())])
    at = np.zeros(2 * n, np.int64)
    at[1::2] = np.arange(1, n + 1)
    roles = pa.array(["system", "user"], pa.string()).take(pa.array(np.tile([0, 1], n)))
    msgs = pa.StructArray.from_arrays([roles, texts.take(pa.array(at))], fields=list(MESSAGE))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), msgs)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The positions starts[k] .. starts[k] + lengths[k] - 1 for every k, concatenated."""
    before = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
    return np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()))


def _line_samples(task: str, style: str, head: np.ndarray, tail: np.ndarray, tail_offsets: np.ndarray,
                  lines: pa.Array, domains: pa.Array, chunk: int) -> pa.Table:
    """Samples whose prompt shows the item ``head[k]``'s line and whose completion writes the lines of
    ``tail[tail_offsets[k]:tail_offsets[k + 1]]``, one per line; the domain is the head item's. A chunk of
    rows at a time (a string column stays far below Arrow's 2 GB per array)."""
    parts = [SFT.arrow.empty_table()]
    for s in range(0, len(head), chunk):
        e = min(len(head), s + chunk)
        h, o = pa.array(head[s:e]), tail_offsets[s:e + 1]
        rest = pa.ListArray.from_arrays(pa.array((o - o[0]).astype(np.int32)), lines.take(pa.array(tail[o[0]:o[-1]])))
        parts.append(pa.table({"task": pa.array([task] * (e - s), pa.string()), "domain": domains.take(h),
                               "prompt": _messages(style, task, lines.take(h)),
                               "completion": pc.binary_join(rest, "\n")}, schema=SFT.arrow))
    return pa.concat_tables(parts)


def sample_tables(items: pa.Table, terms: Any, train: Any, c: SFTConfig, domain_of,
                  chunk: int = 8192) -> dict[str, pa.Table]:
    """Every task's samples (``SFT`` rows, weights applied later) as Arrow tables. ``terms`` is a
    {item: terms} mapping or a terms table, ``train`` each user's training items ({user: items} or (users,
    lists) arrays). Sequence and collaborative samples are built in Arrow (one line per catalog item, then
    gathers and joins); GTI a chunk of rows at a time. A task of weight 0 is not built (the GTI prompts carry
    every item's description). Sequence samples come in user id order, collaborative ones in item id order."""
    tids = _aligned_terms(items, terms)
    out: dict[str, pa.Table] = {}
    if c.gti_weight > 0:
        parts, rows, k = [SFT.arrow.empty_table()], [], 0
        for b in items.to_batches(max_chunksize=chunk):
            for r, t in zip(b.to_pylist(), tids.slice(k, b.num_rows).to_pylist()):
                i = r["item_id"]
                rows.append({"task": "gti", "domain": domain_of(i), "prompt": gti_prompt(r, c.max_item_chars, c.prompt),
                             "completion": tid_completion(t)})
            k += b.num_rows
            parts.append(pa.Table.from_pylist(rows, schema=SFT.arrow))
            rows = []
        out["gti"] = pa.concat_tables(parts)  # left in its chunks: one copy of the samples, not two
    else:
        out["gti"] = SFT.arrow.empty_table()
    # every catalog item's line and domain, in item id order: an item's code is its rank by id
    by_id = pc.sort_indices(items.column("item_id"))
    ids = items.column("item_id").take(by_id)
    write = line_writer(c)
    lines = pa.array([write(t, title) for t, title in zip(tids.take(by_id).to_pylist(),
                                                          items.column("title").take(by_id).to_pylist())], pa.string())
    domains = pa.array([domain_of(i) for i in ids.to_pylist()], pa.string())
    users, lists = _train_arrays(train)
    flat = pc.list_flatten(lists)
    where = pc.index_in(flat, value_set=ids)
    offs = lists.offsets.to_numpy().astype(np.int64)
    offs -= offs[0] if len(offs) else 0
    if where.null_count:
        k = int(np.flatnonzero(~pc.is_valid(where).to_numpy(zero_copy_only=False))[0])
        u = int(np.searchsorted(offs, k, side="right") - 1)
        raise DataError(f"user {users[u].as_py()!r}: training item {flat[k].as_py()!r} is not in the catalog "
                        f"(prepare/items.parquet); {where.null_count} such interactions in all")
    codes = where.to_numpy(zero_copy_only=False).astype(np.int64)
    start = np.maximum(offs[:-1], offs[1:] - c.max_history)  # the last max_history items
    size = offs[1:] - start
    order = pc.sort_indices(users).to_numpy()
    rows = order[size[order] >= 2]  # nothing to predict from a single training item
    rest = size[rows] - 1
    out["seq"] = _line_samples("seq", c.prompt, codes[start[rows]], codes[_ranges(start[rows] + 1, rest)],
                               np.concatenate([[0], np.cumsum(rest)]), lines, domains, chunk)
    if c.collab_weight > 0:
        a, b = co_interaction_pairs(codes, np.repeat(np.arange(len(users)), np.diff(offs)), c.collab_top)
        head, first = np.unique(a, return_index=True)
        out["collab"] = _line_samples("collab", c.prompt, head, b, np.append(first, len(b)), lines, domains, chunk)
    else:
        out["collab"] = SFT.arrow.empty_table()
    return out


def build_samples(items: pa.Table, terms: Any, train_seqs: dict[str, list[str]],
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
    parts = pa.concat_tables([tables[k].cast(SFT.arrow) for k in names]).to_batches()
    at = np.fromiter((pos[t] + r for t, r in order), np.int64, len(order))
    del order
    if not len(at):
        yield SFT.arrow.empty_table()
    for s in range(0, len(at), rows):
        yield take_rows(parts, at[s:s + rows], SFT.arrow)


def mix_tables(tables: dict[str, pa.Table], weights: dict[str, float], seed: int) -> pa.Table:
    """``mix_batches`` as one table."""
    return pa.concat_tables([SFT.arrow.empty_table(), *mix_batches(tables, weights, seed)])


def _fill_missing(items: pa.Table, terms_t: pa.Table) -> tuple[pa.Table, int]:
    """TIDs from their own words for items the terms table lacks; collisions re-resolved."""

    rest = items.filter(pc.invert(pc.is_in(items.column("item_id"), value_set=terms_t.column("item_id")))).to_pylist()
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


def _keep_provided(ctx: StageContext, cfg: GrlmConfig, terms_t: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """``sft.provided_domains`` (``lib/terms.py: keep_provided``) on the table the SFT data is made from."""
    provided = ctx.read_if_exists("terms.parquet", TERMS, stage="prepare")
    return keep_provided(terms_t, provided, cfg.sft.provided_domains, domain_lookup(cfg))


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
    c = cfg.sft
    src_stage, src_file = terms_location(cfg)

    def body(ctx: StageContext) -> None:
        items = ctx.read("items.parquet", ITEMS, stage="prepare")
        seqs = ctx.read("sequences.parquet", SEQUENCES, stage="prepare")
        targets = ctx.read("targets.parquet", TARGETS, stage="prepare")
        terms_t = ctx.read(src_file, TERMS, stage=src_stage)
        kept = {}
        if c.provided_domains and c.terms != "compress":  # compressed terms hold them already (compress stage)
            terms_t, kept = _keep_provided(ctx, cfg, terms_t)
        filled = 0
        if c.missing_terms == "words":
            terms_t, filled = _fill_missing(items, terms_t)
        collisions = None
        if c.resolve_collisions:
            terms_t, report = resolve_terms_table(terms_t, items)
            collisions = report.as_dict()
        terms_t = terms_t.filter(pc.is_in(terms_t.column("item_id"), value_set=items.column("item_id")))
        ctx.write("terms.parquet", terms_t, TERMS)
        users, lists = seqs.column("user_id").combine_chunks(), training_lists(seqs, targets)
        del seqs, targets
        release_arrow_memory()
        n_items = items.num_rows
        if c.gti_weight <= 0:  # the descriptions are read by the GTI prompts only
            items = items.select(["item_id", "title"])
        samples = sample_tables(items, terms_t.select(["item_id", "terms"]), (users, lists), c, domain_lookup(cfg))
        del items, terms_t
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
            **({"provided_tids_kept": kept} if c.provided_domains else {}),
            "samples": dict(tasks), "natural_samples": {k: v.num_rows for k, v in samples.items()} | (
                {"gti": n_items} if c.gti_weight <= 0 else {}),
            "per_domain": dict(domains),
            "users_without_seq_sample": int((np.minimum(np.diff(lists.offsets.to_numpy()), c.max_history) < 2).sum()),
            "example": {t: samples[t].slice(0, 1).to_pylist()[0] for t in samples if samples[t].num_rows},
        })

    return Run.of(cfg).run_stage(STAGE, body, key=stage_key(cfg, STAGE, PROMPT_VERSION),
                                 inputs={"terms": (src_stage, src_file)})


