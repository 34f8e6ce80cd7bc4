"""The evaluation protocol, shared by eval, validation during training, the baselines, serving and the
diagnostics: which target rows are scored (the same seeded users for every model), the popularity
ranking (the fallback and the floor), and each query's prompt (the training text format, up to the target).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from grlm_ray.core.config import GrlmConfig
from grlm_ray.lib.textformat import domain_lookup, history_prompt, line_writer, training_lists
from grlm_ray.lib.tokens import render_prompt


def popularity_ranking(train_seqs: dict[str, list[str]]) -> list[str]:
    """Items by training interaction count, ties by item id."""
    counts = Counter(i for items in train_seqs.values() for i in items)
    return [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def training_popularity(sequences: pa.Table, targets: pa.Table) -> list[str]:
    """``popularity_ranking(training_sequences(...))`` on Arrow columns: training interactions (every
    held-out target position removed) counted without a Python list per user."""
    import pyarrow.compute as pc

    counts = pc.value_counts(pc.list_flatten(training_lists(sequences, targets)))
    t = pa.table({"item": counts.field("values"), "n": counts.field("counts")})
    return t.take(pc.sort_indices(t, [("n", "descending"), ("item", "ascending")])).column("item").to_pylist()


def target_rows(targets: pa.Table, split: str, limit: int | None, seed: int) -> pa.Table:
    """The target rows of a split, or a seeded sample of ``limit`` of them (in target order): the same users
    for GRLM, popularity and the baselines."""
    import pyarrow.compute as pc

    t = targets.filter(pc.equal(targets.column("split"), split))
    if limit is not None and t.num_rows > limit:
        rng = np.random.default_rng(seed)
        t = t.take(pa.array(np.sort(rng.choice(t.num_rows, size=limit, replace=False))))
    return t


def _sequences_of(seqs: pa.Table, t: pa.Table) -> tuple[list[list[str]], list[int]]:
    """Each target row's whole sequence and the target's position in it."""
    import pyarrow.compute as pc

    hist = seqs.column("item_ids").take(pc.index_in(t.column("user_id"), value_set=seqs.column("user_id")))
    return hist.to_pylist(), t.column("position").to_pylist()


def last_history_items(seqs: pa.Table, t: pa.Table) -> list[str | None]:
    """The item just before each target of ``t`` (rows of ``target_rows``) in its user's sequence: the last
    item of the history the target is predicted from (None for a target at position 0)."""
    return [h[p - 1] if p > 0 else None for h, p in zip(*_sequences_of(seqs, t))]


def history_items(seqs: pa.Table, t: pa.Table) -> list[list[str]]:
    """Each target's history (rows of ``target_rows``): the items before it in its user's sequence, oldest first."""
    return [h[:p] for h, p in zip(*_sequences_of(seqs, t))]


def select_targets(targets: pa.Table, split: str, limit: int | None, seed: int) -> list[dict[str, Any]]:
    """``target_rows`` as row dicts."""
    return target_rows(targets, split, limit, seed).to_pylist()


QUERIES = pa.schema([("row", pa.int64()), ("user_id", pa.string()), ("split", pa.string()), ("domain", pa.string()),
                     ("target_item_id", pa.string()), ("history", pa.list_(pa.string())), ("prompt", pa.string())])


def item_lines(cfg: GrlmConfig, items: pa.Table, terms: pa.Table | dict[str, list[str]],
               chunk: int = 65536) -> tuple[pa.Array, pa.Array]:
    """(item ids, their history lines) for every item with a TID, as two Arrow string arrays: the text a
    history shows for each item (``textformat.line_writer``: TID, or TID and title). Python objects exist
    for ``chunk`` items at a time (a dict of every item's terms and title was ~0.4 GB at 300k items)."""
    import pyarrow.compute as pc

    if isinstance(terms, dict):
        terms = pa.table({"item_id": pa.array(list(terms), pa.string()),
                          "terms": pa.array(list(terms.values()), pa.list_(pa.string()))})
    ids = terms.column("item_id").combine_chunks()
    at = pc.index_in(ids, value_set=items.column("item_id"))
    titles = pc.fill_null(items.column("title").take(at), "") if items.num_rows else pa.nulls(len(ids), pa.string())
    write = line_writer(cfg.sft)
    parts = []
    for s in range(0, len(ids), chunk):
        tids, ts = terms.column("terms").slice(s, chunk).to_pylist(), titles.slice(s, chunk).to_pylist()
        parts.append(pa.array([write(t, title or "") for t, title in zip(tids, ts)], pa.string()))
    return ids, (pa.concat_arrays(parts) if parts else pa.array([], pa.string()))


def query_table(cfg: GrlmConfig, items: pa.Table, seqs: pa.Table, targets: pa.Table,
                terms: pa.Table | dict[str, list[str]], tokenizer: Any, chunk: int = 8192,
                history: bool = True) -> pa.Table:
    """One row per scored target (``QUERIES``): its user, domain, history and rendered prompt. ``terms``:
    the TERMS table (or an item -> TID dict). Built ``chunk`` targets at a time from Arrow columns, each
    history's lines looked up by position in one array of lines (``item_lines``); Python objects exist for
    one chunk only (all test users' queries as row dicts took ~2.9 GB at 300k items, and the per-item dicts
    of terms and titles another ~0.4 GB: ``grlm bench scale``). ``history=False``: without the ``history``
    column (the item ids; the evaluation needs only the prompt: 0.2 GB at 1M items)."""
    import pyarrow.compute as pc

    e = cfg.eval
    ids, lines = item_lines(cfg, items, terms)
    t = target_rows(targets, e.split, e.limit_users, e.seed)
    where = pc.index_in(t.column("user_id"), value_set=seqs.column("user_id"))
    if where.null_count:
        missing = t.column("user_id").filter(pc.is_null(where))[0].as_py()
        raise KeyError(f"targets.parquet: user {missing!r} has a {e.split} target but no row in sequences.parquet")
    all_histories = seqs.column("item_ids")
    domain_of = domain_lookup(cfg)
    keep = cfg.sft.max_history
    schema = QUERIES if history else QUERIES.remove(QUERIES.get_field_index("history"))
    parts = []
    for s in range(0, t.num_rows, chunk):
        part = t.slice(s, chunk).to_pylist()
        hs = all_histories.take(where.slice(s, chunk))  # this chunk's users only: not every history copied
        hs = hs.combine_chunks() if isinstance(hs, pa.ChunkedArray) else hs
        flat = pc.list_flatten(hs)
        code = pc.fill_null(pc.index_in(flat, value_set=ids), -1).to_numpy(zero_copy_only=False)
        offsets = hs.offsets.to_numpy() - hs.offsets[0].as_py()
        # the shown part of each history (its last max_history items before the target), one take for the chunk
        spans = [(int(offsets[j]) + max(0, r["position"] - keep), int(offsets[j]) + r["position"])
                 for j, r in enumerate(part)]
        at = np.concatenate([np.arange(a, b) for a, b in spans] or [np.zeros(0, np.int64)]).astype(np.int64)
        shown = code[at].astype(np.int64)
        if (shown < 0).any():
            missing = flat[int(at[np.flatnonzero(shown < 0)[0]])].as_py()
            raise KeyError(f"item {missing!r} of a history has no TID (terms.parquet)")
        shown_lines = lines.take(pa.array(shown)).to_pylist()
        hs_py = hs.to_pylist() if history else [None] * len(part)
        cols: dict[str, list[Any]] = {k: [] for k in schema.names}
        n = 0
        for j, (r, h) in enumerate(zip(part, hs_py)):
            pos = r["position"]
            a, b = spans[j]
            msgs, prefix = history_prompt(shown_lines[n:n + b - a], keep, cfg.sft.prompt)
            n += b - a
            for k, v in (("row", s + j), ("user_id", r["user_id"]), ("split", r["split"]),
                         ("domain", r["domain"] or domain_of(r["target_item_id"])),
                         ("target_item_id", r["target_item_id"]), ("history", h[:pos] if history else None),
                         ("prompt", render_prompt(tokenizer, msgs, cfg.model.enable_thinking, prefix))):
                if k in cols:
                    cols[k].append(v)
        parts.append(pa.table(cols, schema=schema))
    return pa.concat_tables(parts) if parts else schema.empty_table()


def build_queries(cfg: GrlmConfig, items: pa.Table, seqs: pa.Table, targets: pa.Table,
                  terms: dict[str, list[str]], tokenizer: Any) -> list[dict[str, Any]]:
    """``query_table`` as row dicts (validation's and the diagnostics' few thousand users)."""
    return query_table(cfg, items, seqs, targets, terms, tokenizer).to_pylist()
