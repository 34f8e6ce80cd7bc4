"""Reader for the official Amazon 2014 files.

- ``reviews_<Category>_5.json.gz``: one JSON object per line (reviewerID, asin, unixReviewTime, ...).
- ``meta_<Category>.json.gz``: one *Python literal* dict per line (single quotes), not strict JSON;
  fields asin, title, description, brand, categories (a list of category paths).

Bad lines never vanish: malformed lines and lines missing a needed field are recorded in the rejects
(file, line, field); bytes that are not UTF-8 are replaced (U+FFFD) and recorded as repaired.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pyarrow as pa

from grlm_ray.core.errors import DataError
from grlm_ray.core.schemas import ITEMS
from grlm_ray.stages.prepare.core import Rejects

_ASIN = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")


def _open(path: Path):
    if not path.is_file():
        raise DataError("file not found", where=str(path))
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _lines(path: Path, rejects: Rejects) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded text) for each non-blank line."""
    with _open(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                text = raw.decode("utf-8", errors="replace")
                rejects.add(str(path), lineno, "", f"non-UTF-8 bytes replaced: {e.reason} at byte {e.start}",
                            action="repaired", value=raw[max(0, e.start - 20):e.start + 20])
            yield lineno, text


def _parse_obj(text: str, allow_literal: bool) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        if not allow_literal:
            raise
        obj = ast.literal_eval(text)  # meta files are Python literals
    if not isinstance(obj, dict):
        raise ValueError(f"expected an object, got {type(obj).__name__}")
    return obj


def read_reviews(path: Path, rejects: Rejects) -> pd.DataFrame:
    """Interactions (user_id, item_id, timestamp, order) from a reviews file; order = line number."""
    users, items, stamps, order = [], [], [], []
    for lineno, text in _lines(path, rejects):
        try:
            obj = _parse_obj(text, allow_literal=False)
        except (ValueError, json.JSONDecodeError) as e:
            rejects.add(str(path), lineno, "", f"malformed JSON line: {e}", value=text)
            continue
        missing = [k for k in ("reviewerID", "asin", "unixReviewTime") if obj.get(k) in (None, "")]
        if missing:
            rejects.add(str(path), lineno, missing[0], f"missing field: {missing[0]}", value=text)
            continue
        try:
            ts = int(obj["unixReviewTime"])
        except (TypeError, ValueError):
            rejects.add(str(path), lineno, "unixReviewTime", "not an integer timestamp",
                        value=obj["unixReviewTime"])
            continue
        users.append(str(obj["reviewerID"]))
        items.append(str(obj["asin"]))
        stamps.append(ts)
        order.append(lineno)
    return pd.DataFrame({
        "user_id": pd.Series(users, dtype=str), "item_id": pd.Series(items, dtype=str),
        "timestamp": pd.Series(stamps, dtype="Int64"), "order": pd.Series(order, dtype="int64"),
    })


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # some descriptions are lists of paragraphs
        value = " ".join(str(v) for v in value)
    return str(value)  # entities, controls and whitespace: cleaned for every source in prepare (data.clean_text)


def _categories(value: Any) -> list[str]:
    """Flatten the category paths, dropping duplicates and keeping first-seen order."""
    out: list[str] = []
    if isinstance(value, list):
        for path in value:
            for c in (path if isinstance(path, list) else [path]):
                c = _text(c)
                if c and c not in out:
                    out.append(c)
    return out


def read_meta(path: Path, wanted: set[str], category: str, rejects: Rejects) -> pa.Table:
    """Items table for the asins in ``wanted`` (others are skipped unparsed where possible)."""
    rows: dict[str, dict[str, Any]] = {}
    for lineno, text in _lines(path, rejects):
        # Cheap pre-filter: meta files hold every product of the category (millions of lines) while
        # the 5-core reviews name a small share; skip the slow literal parse for the others.
        m = _ASIN.search(text)
        if m is not None and m.group(1) not in wanted:
            continue
        try:
            obj = _parse_obj(text, allow_literal=True)
        except (ValueError, SyntaxError, json.JSONDecodeError) as e:
            rejects.add(str(path), lineno, "", f"malformed meta line: {type(e).__name__}: {e}", value=text)
            continue
        asin = obj.get("asin")
        if not asin:
            rejects.add(str(path), lineno, "asin", "missing field: asin", value=text)
            continue
        asin = str(asin)
        if asin not in wanted:
            continue
        if asin in rows:
            rejects.add(str(path), lineno, "asin", f"duplicate asin {asin}: first line kept", value=asin)
            continue
        rows[asin] = {
            "item_id": asin,
            "category": category,
            "title": _text(obj.get("title")),
            "description": _text(obj.get("description")),
            "brand": _text(obj.get("brand")),
            "categories": _categories(obj.get("categories")),
            "source_id": asin,
        }
    table = pa.Table.from_pylist(list(rows.values()), schema=ITEMS.arrow)
    return table


def default_files(category: str) -> tuple[str, str]:
    return f"reviews_{category}_5.json.gz", f"meta_{category}.json.gz"
