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


def select_targets(targets: pa.Table, split: str, limit: int | None, seed: int) -> list[dict[str, Any]]:
    """``target_rows`` as row dicts."""
    return target_rows(targets, split, limit, seed).to_pylist()


QUERIES = pa.schema([("row", pa.int64()), ("user_id", pa.string()), ("split", pa.string()), ("domain", pa.string()),
                     ("target_item_id", pa.string()), ("history", pa.list_(pa.string())), ("prompt", pa.string())])


def query_table(cfg: GrlmConfig, items: pa.Table, seqs: pa.Table, targets: pa.Table,
                terms: dict[str, list[str]], tokenizer: Any, chunk: int = 8192) -> pa.Table:
    """One row per scored target (``QUERIES``): its user, domain, history and rendered prompt. Built
    ``chunk`` targets at a time from Arrow columns; Python objects exist for one chunk only (all test users'
    queries as row dicts took ~2.9 GB at 300k items, ``grlm bench scale``)."""
    import pyarrow.compute as pc

    e = cfg.eval
    titles = dict(zip(items.column("item_id").to_pylist(), items.column("title").to_pylist()))
    t = target_rows(targets, e.split, e.limit_users, e.seed)
    where = pc.index_in(t.column("user_id"), value_set=seqs.column("user_id"))
    if where.null_count:
        missing = t.column("user_id").filter(pc.is_null(where))[0].as_py()
        raise KeyError(f"targets.parquet: user {missing!r} has a {e.split} target but no row in sequences.parquet")
    histories = seqs.column("item_ids").take(where)
    domain_of = domain_lookup(cfg)
    write = line_writer(cfg.sft)
    parts = []
    for s in range(0, t.num_rows, chunk):
        part, hs = t.slice(s, chunk).to_pylist(), histories.slice(s, chunk).to_pylist()
        cols: dict[str, list[Any]] = {k: [] for k in QUERIES.names}
        for j, (r, h) in enumerate(zip(part, hs)):
            history = h[: r["position"]]
            lines = [write(terms[i], titles.get(i, "")) for i in history[-cfg.sft.max_history:]]
            msgs, prefix = history_prompt(lines, cfg.sft.max_history, cfg.sft.prompt)
            for k, v in (("row", s + j), ("user_id", r["user_id"]), ("split", r["split"]),
                         ("domain", r["domain"] or domain_of(r["target_item_id"])),
                         ("target_item_id", r["target_item_id"]), ("history", history),
                         ("prompt", render_prompt(tokenizer, msgs, cfg.model.enable_thinking, prefix))):
                cols[k].append(v)
        parts.append(pa.table(cols, schema=QUERIES))
    return pa.concat_tables(parts) if parts else QUERIES.empty_table()


def build_queries(cfg: GrlmConfig, items: pa.Table, seqs: pa.Table, targets: pa.Table,
                  terms: dict[str, list[str]], tokenizer: Any) -> list[dict[str, Any]]:
    """``query_table`` as row dicts (validation's and the diagnostics' few thousand users)."""
    return query_table(cfg, items, seqs, targets, terms, tokenizer).to_pylist()
