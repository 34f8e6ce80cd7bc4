"""Bring your own data: an items table and an interactions table, CSV or Parquet.

Column names are mapped by config (``item_columns`` / ``interaction_columns``). Errors name the file,
the row (CSV: the 1-based line, header = line 1; Parquet: the 0-based row) and the field.
- missing / misnamed columns, duplicate item ids, empty item ids: DataError (nothing sensible to keep);
- interactions with a null id, an unknown item or a bad timestamp: dropped and recorded in the rejects
  (or a DataError with ``invalid_rows: error``);
- non-UTF-8 bytes: replaced (U+FFFD) and recorded as repaired; empty titles are kept and counted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from grlm_ray.core.config import ByoSource
from grlm_ray.core.errors import DataError
from grlm_ray.core.schemas import ITEMS
from grlm_ray.stages.prepare.core import Rejects


def _is_csv(path: Path) -> bool:
    return path.suffix.lower() in (".csv", ".tsv", ".txt") or path.name.lower().endswith((".csv.gz", ".tsv.gz"))


def row_label(path: Path, row: int) -> int:
    """What rejects and errors call a row: the CSV line (header = 1) or the Parquet row."""
    return row + 2 if _is_csv(path) else row


def read_any(path: Path, rejects: Rejects) -> pa.Table:
    """Read CSV (every column as text, bytes checked as UTF-8) or Parquet."""
    if not path.is_file():
        raise DataError("file not found", where=str(path))
    if not _is_csv(path):
        try:
            return pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"not a readable Parquet file: {e}", where=str(path)) from e
    delimiter = "\t" if ".tsv" in path.name.lower() else ","
    try:
        names = pacsv.open_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter)).schema.names
        table = pacsv.read_csv(
            path, parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=False),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.binary() for n in names},
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid as e:
        raise DataError(f"not a readable CSV file: {e}", where=str(path)) from e
    cols = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        try:
            cols[name] = col.cast(pa.string())
        except pa.ArrowInvalid:  # some value is not UTF-8: repair those values one by one
            values = []
            for row, b in enumerate(col.to_pylist()):
                try:
                    values.append(None if b is None else b.decode("utf-8"))
                except UnicodeDecodeError as e:
                    values.append(b.decode("utf-8", errors="replace"))
                    rejects.add(str(path), row + 2, name, f"non-UTF-8 bytes replaced: {e.reason}",
                                action="repaired", value=b[:80])
            cols[name] = pa.array(values, pa.string())
    return pa.table(cols)


def _require(table: pa.Table, path: Path, column: str, role: str) -> None:
    if column not in table.column_names:
        raise DataError(
            f"missing column for {role} (found: {', '.join(table.column_names)}); "
            f"map it in the config or set it to null if absent", where=str(path), field=column)


def read_items(src: ByoSource, path: Path, rejects: Rejects) -> pa.Table:
    raw = read_any(path, rejects)
    cols = src.item_columns
    _require(raw, path, cols.item_id, "item_columns.item_id")
    for role in ("title", "description", "brand", "category", "categories"):
        name = getattr(cols, role)
        if name is not None:
            _require(raw, path, name, f"item_columns.{role}")
    n = raw.num_rows
    ids = pc.cast(raw.column(cols.item_id), pa.string()).combine_chunks()
    bad = pc.or_(pc.is_null(ids), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(pc.fill_null(ids, ""))), 0))
    if pc.any(bad).as_py():
        row = int(pc.indices_nonzero(pc.fill_null(bad, True))[0].as_py())
        raise DataError("empty item id", where=str(path), row=row_label(path, row), field=cols.item_id)
    ids = pc.utf8_trim_whitespace(ids)
    if pc.count_distinct(ids).as_py() != n:
        seen: dict[str, int] = {}
        for row, v in enumerate(ids.to_pylist()):
            if v in seen:
                raise DataError(f"duplicate item id {v!r} (also at row {row_label(path, seen[v])})",
                                where=str(path), row=row_label(path, row), field=cols.item_id)
            seen[v] = row

    def text(role: str, default: str = "") -> pa.Array:
        name = getattr(cols, role)
        if name is None:
            return pa.array([default] * n, pa.string())
        return pc.fill_null(pc.cast(raw.column(name), pa.string()), default).combine_chunks()

    if cols.categories is None:
        categories = pa.array([[]] * n, pa.list_(pa.string()))
    else:
        c = raw.column(cols.categories).combine_chunks()
        if pa.types.is_list(c.type) or pa.types.is_large_list(c.type):
            categories = pc.cast(c, pa.list_(pa.string()))
        else:
            categories = pa.array([[p.strip() for p in (s or "").split("|") if p.strip()]
                                   for s in pc.cast(c, pa.string()).to_pylist()], pa.list_(pa.string()))
    return pa.table({
        "item_id": ids, "category": text("category", src.default_category), "title": text("title"),
        "description": text("description"), "brand": text("brand"), "categories": categories,
        "source_id": pa.nulls(n, pa.string()),
    }, schema=ITEMS.arrow)


def _timestamps(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int64 epoch seconds, ok mask) from integers, numeric strings or ISO-8601 date strings."""
    if pa.types.is_integer(values.type):
        ok = pc.is_valid(values).to_numpy(zero_copy_only=False)
        return pc.fill_null(values, 0).to_numpy(zero_copy_only=False).astype(np.int64), ok
    if pa.types.is_timestamp(values.type):
        ok = pc.is_valid(values).to_numpy(zero_copy_only=False)
        secs = pc.cast(pc.cast(values, pa.timestamp("s")), pa.int64())
        return pc.fill_null(secs, 0).to_numpy(zero_copy_only=False), ok
    s = pd.Series(pc.cast(values, pa.string()).to_pylist(), dtype=object)
    num = pd.to_numeric(s, errors="coerce")
    out = num.copy()
    need = num.isna() & s.notna() & (s.astype(str).str.strip() != "")
    if need.any():
        dt = pd.to_datetime(s[need], errors="coerce", utc=True, format="mixed")
        out[need] = (dt - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    ok = out.notna().to_numpy()
    return out.fillna(0).astype("int64").to_numpy(), ok


def read_interactions(src: ByoSource, path: Path, known_items: set[str], rejects: Rejects) -> pd.DataFrame:
    raw = read_any(path, rejects)
    cols = src.interaction_columns
    _require(raw, path, cols.user_id, "interaction_columns.user_id")
    _require(raw, path, cols.item_id, "interaction_columns.item_id")
    if cols.timestamp is not None:
        _require(raw, path, cols.timestamp, "interaction_columns.timestamp")
    n = raw.num_rows
    users = pc.utf8_trim_whitespace(pc.cast(raw.column(cols.user_id), pa.string())).to_pylist()
    items = pc.utf8_trim_whitespace(pc.cast(raw.column(cols.item_id), pa.string())).to_pylist()
    if cols.timestamp is not None:
        ts, ts_ok = _timestamps(raw.column(cols.timestamp).combine_chunks())
    else:
        ts, ts_ok = np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool)
    keep = np.ones(n, dtype=bool)
    where = str(path)
    for row in range(n):
        u, it = users[row], items[row]
        if not u:
            rejects.add(where, row_label(path, row), cols.user_id, "empty user id")
        elif not it:
            rejects.add(where, row_label(path, row), cols.item_id, "empty item id")
        elif it not in known_items:
            rejects.add(where, row_label(path, row), cols.item_id, f"unknown item id: {it} is not in the items table",
                        value=it)
        elif not ts_ok[row]:
            rejects.add(where, row_label(path, row), cols.timestamp or "", "unparseable timestamp",
                        value=raw.column(cols.timestamp)[row].as_py())
        else:
            continue
        keep[row] = False
    idx = np.flatnonzero(keep)
    return pd.DataFrame({
        "user_id": pd.Series([users[i] for i in idx], dtype=str),
        "item_id": pd.Series([items[i] for i in idx], dtype=str),
        "timestamp": pd.Series(ts[idx] if cols.timestamp is not None else [pd.NA] * len(idx), dtype="Int64"),
        "order": pd.Series(idx, dtype="int64"),
    })
