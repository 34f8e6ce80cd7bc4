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
from grlm_ray.lib.textformat import domain_lookup, history_prompt, line_writer
from grlm_ray.lib.tokens import render_prompt


def popularity_ranking(train_seqs: dict[str, list[str]]) -> list[str]:
    """Items by training interaction count, ties by item id."""
    counts = Counter(i for items in train_seqs.values() for i in items)
    return [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def select_targets(targets: pa.Table, split: str, limit: int | None, seed: int) -> list[dict[str, Any]]:
    """The target rows of a split, or a seeded sample of ``limit`` of them (in target order): the same users
    for GRLM, popularity and the baselines."""
    rows = [r for r in targets.to_pylist() if r["split"] == split]
    if limit is not None and len(rows) > limit:
        rng = np.random.default_rng(seed)
        rows = [rows[j] for j in np.sort(rng.choice(len(rows), size=limit, replace=False))]
    return rows


def build_queries(cfg: GrlmConfig, items: pa.Table, seqs: pa.Table, targets: pa.Table,
                  terms: dict[str, list[str]], tokenizer: Any) -> list[dict[str, Any]]:

    e = cfg.eval
    titles = dict(zip(items.column("item_id").to_pylist(), items.column("title").to_pylist()))
    by_user = dict(zip(seqs.column("user_id").to_pylist(), seqs.column("item_ids").to_pylist()))
    rows = select_targets(targets, e.split, e.limit_users, e.seed)
    domain_of = domain_lookup(cfg)
    write = line_writer(cfg.sft)
    out = []
    for r in rows:
        history = by_user[r["user_id"]][: r["position"]]
        lines = [write(terms[i], titles.get(i, "")) for i in history]
        msgs, prefix = history_prompt(lines, cfg.sft.max_history, cfg.sft.prompt)
        out.append({"row": len(out), "user_id": r["user_id"], "split": r["split"],
                    "domain": r["domain"] or domain_of(r["target_item_id"]), "target_item_id": r["target_item_id"],
                    "history": history,
                    "prompt": render_prompt(tokenizer, msgs, cfg.model.enable_thinking, prefix)})
    return out
