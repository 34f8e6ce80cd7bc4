"""Reader for a prepared bundle such as ``../shared/data/amazon2014/<dataset>/``.

items.parquet: item_id int, asin, title (nullable), tid list<str> (the authors' Term IDs), categories
list<str> (optional: the item's category path, e.g. Toys), ...
sequences.parquet: user_id int, item_ids list<int> (chronological; no timestamps).
The ids keep the bundle's numbering (as strings) so results compare with the reference code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grlm_ray.core.errors import DataError
from grlm_ray.core.schemas import ITEMS, TERMS
from grlm_ray.stages.prepare.core import Rejects


def _read(path: Path, needed: list[str]) -> pa.Table:
    if not path.is_file():
        raise DataError("file not found", where=str(path))
    table = pq.read_table(path)
    for col in needed:
        if col not in table.column_names:
            raise DataError(f"missing column (found: {', '.join(table.column_names)})", where=str(path), field=col)
    return table


def _as_str(arr: pa.ChunkedArray) -> pa.Array:
    return pc.cast(arr, pa.string()).combine_chunks()


def read_bundle(directory: Path, category: str, rejects: Rejects,
                description: str | None = None) -> tuple[pa.Table, pd.DataFrame, pa.Table | None]:
    """(items, interactions in sequence order, provided terms or None); ``description``: a column of the items
    file read as the items' description (none: empty)."""
    items_path, seq_path = directory / "items.parquet", directory / "sequences.parquet"
    raw = _read(items_path, ["item_id"] + ([description] if description else []))
    n = raw.num_rows
    ids = _as_str(raw.column("item_id"))
    if ids.null_count:
        row = int(pc.indices_nonzero(pc.is_null(ids))[0].as_py())
        raise DataError("null item id", where=str(items_path), row=row, field="item_id")

    def text(col: str) -> pa.Array:
        if col not in raw.column_names:
            return pa.array([""] * n, pa.string())
        return pc.fill_null(_as_str(raw.column(col)), "")

    def categories() -> pa.Array:
        if "categories" not in raw.column_names:
            return pa.array([[]] * n, pa.list_(pa.string()))
        col = raw.column("categories").combine_chunks()
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
            raise DataError(f"expected a list of strings, found {col.type}", where=str(items_path),
                            field="categories")
        return pc.fill_null(col.cast(pa.list_(pa.string())), pa.scalar([], pa.list_(pa.string())))

    items = pa.table({
        "item_id": ids,
        "category": pa.array([category] * n, pa.string()),
        "title": text("title"),
        "description": text(description) if description else pa.array([""] * n, pa.string()),
        "brand": pa.array([""] * n, pa.string()),
        "categories": categories(),
        "source_id": _as_str(raw.column("asin")) if "asin" in raw.column_names else pa.nulls(n, pa.string()),
    }, schema=ITEMS.arrow)

    seqs = _read(seq_path, ["user_id", "item_ids"])
    users = _as_str(seqs.column("user_id"))
    lists = seqs.column("item_ids").combine_chunks()
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    flat = pc.cast(pc.list_flatten(lists), pa.string()).to_numpy(zero_copy_only=False)
    user_rep = np.repeat(users.to_numpy(zero_copy_only=False), lengths)
    interactions = pd.DataFrame({
        "user_id": pd.Series(user_rep, dtype=str),
        "item_id": pd.Series(flat, dtype=str),
        "timestamp": pd.Series([pd.NA] * len(flat), dtype="Int64"),
        "order": pd.Series(np.arange(len(flat)), dtype="int64"),
    })

    terms = None
    if "tid" in raw.column_names:
        tid = raw.column("tid").combine_chunks()
        has = pc.and_(pc.is_valid(tid), pc.greater(pc.list_value_length(tid), 0))
        for row in pc.indices_nonzero(pc.invert(pc.fill_null(has, False))).to_pylist():
            rejects.add(str(items_path), row, "tid", f"item {ids[row].as_py()} has no provided TID",
                        action="noted", value="")  # the item stays; it just has no provided terms
        keep_ids = pc.filter(ids, has)
        keep_tid = pc.filter(tid, has)
        raw_text = [" ".join(t) for t in keep_tid.to_pylist()]
        terms = pa.table({
            "item_id": keep_ids,
            "terms": keep_tid.cast(pa.list_(pa.string())),
            "raw": pa.array(raw_text, pa.string()),
            "valid": pa.array([True] * len(raw_text), pa.bool_()),
            "source": pa.array(["provided"] * len(raw_text), pa.string()),
        }, schema=TERMS.arrow)
    return items, interactions, terms
