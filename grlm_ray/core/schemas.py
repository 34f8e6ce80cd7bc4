"""Data contracts: one pyarrow schema per artifact, checked on every read and write.

| artifact    | columns                                                                          |
|-------------|----------------------------------------------------------------------------------|
| items       | item_id str (unique), category str, title str, description str, brand str,       |
|             | categories list<str>; optional: source_id str (e.g. the Amazon asin)             |
| sequences   | user_id str (unique), item_ids list<str> (chronological, >= 1 item),             |
|             | timestamps list<int64> (nullable; same length as item_ids when present)          |
| targets     | user_id str, split str (valid|test), domain str, position int32,                 |
|             | target_item_id str  -- history = sequences.item_ids[:position]                   |
| terms       | item_id str (unique), terms list<str>, raw str, valid bool, source str           |
| embeddings  | item_id str (unique), embedding fixed_size_list<float32>                         |
| neighbors   | item_id str (unique), neighbor_ids list<str>, scores list<float32>               |
| sft         | task str, domain str, prompt list<struct<role str, content str>>, completion str |
| predictions | user_id str, split str, domain str, target_item_id str, candidates list<str>,    |
|             | ranked_item_ids list<str>, grounded_by list<str>                                 |
| rejects     | source str, line int64 (nullable), field str, reason str, action str, value str  |

Strings are never null in required columns: a missing title is the empty string. Text columns
may be empty; ids may not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from grlm_ray.core.errors import DataError

STR = pa.string()
LIST_STR = pa.list_(pa.string())


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    nullable: bool = False
    required: bool = True
    nonempty: bool = False  # strings / lists that must not be empty (ids, item lists)


@dataclass(frozen=True)
class ArtifactSchema:
    name: str
    columns: tuple[Column, ...]
    unique: tuple[str, ...] = ()
    fixed_size_list_ok: tuple[str, ...] = field(default=())  # any list size is fine

    @property
    def arrow(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.type, nullable=c.nullable) for c in self.columns])

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)


ITEMS = ArtifactSchema(
    "items",
    (
        Column("item_id", STR, nonempty=True),
        Column("category", STR),
        Column("title", STR),
        Column("description", STR),
        Column("brand", STR),
        Column("categories", LIST_STR),
        Column("source_id", STR, nullable=True, required=False),
    ),
    unique=("item_id",),
)

SEQUENCES = ArtifactSchema(
    "sequences",
    (
        Column("user_id", STR, nonempty=True),
        Column("item_ids", LIST_STR, nonempty=True),
        Column("timestamps", pa.list_(pa.int64()), nullable=True),
    ),
    unique=("user_id",),
)

TARGETS = ArtifactSchema(
    "targets",
    (
        Column("user_id", STR, nonempty=True),
        Column("split", STR, nonempty=True),
        Column("domain", STR),
        Column("position", pa.int32()),
        Column("target_item_id", STR, nonempty=True),
    ),
)

TERMS = ArtifactSchema(
    "terms",
    (
        Column("item_id", STR, nonempty=True),
        Column("terms", LIST_STR),
        Column("raw", STR),
        Column("valid", pa.bool_()),
        Column("source", STR, nonempty=True),
    ),
    unique=("item_id",),
)

EMBEDDINGS = ArtifactSchema(
    "embeddings",
    (
        Column("item_id", STR, nonempty=True),
        Column("embedding", pa.list_(pa.float32())),
    ),
    unique=("item_id",),
    fixed_size_list_ok=("embedding",),
)

NEIGHBORS = ArtifactSchema(
    "neighbors",
    (
        Column("item_id", STR, nonempty=True),
        Column("neighbor_ids", LIST_STR),
        Column("scores", pa.list_(pa.float32())),
    ),
    unique=("item_id",),
)

MESSAGE = pa.struct([pa.field("role", STR), pa.field("content", STR)])
SFT = ArtifactSchema(
    "sft",
    (
        Column("task", STR, nonempty=True),
        Column("domain", STR),
        Column("prompt", pa.list_(MESSAGE)),
        Column("completion", STR),
    ),
)

PREDICTIONS = ArtifactSchema(
    "predictions",
    (
        Column("user_id", STR, nonempty=True),
        Column("split", STR),
        Column("domain", STR),
        Column("target_item_id", STR),
        Column("candidates", LIST_STR),
        Column("ranked_item_ids", LIST_STR),
        Column("grounded_by", LIST_STR),
    ),
)

REJECTS = ArtifactSchema(
    "rejects",
    (
        Column("source", STR),
        Column("line", pa.int64(), nullable=True),
        Column("field", STR),
        Column("reason", STR),
        Column("action", STR),  # dropped | repaired | noted (kept as is)
        Column("value", STR),
    ),
)

# prepare/raw_text: the source text of every item field that prepare cleaned (data.clean_text), as read
RAW_TEXT = ArtifactSchema(
    "raw_text",
    (
        Column("item_id", STR, nonempty=True),
        Column("field", STR),  # title | description | brand | category | categories (JSON list)
        Column("raw", STR),
    ),
)

ARTIFACTS: dict[str, ArtifactSchema] = {
    s.name: s for s in (ITEMS, SEQUENCES, TARGETS, TERMS, EMBEDDINGS, NEIGHBORS, SFT, PREDICTIONS, REJECTS, RAW_TEXT)
}


def _compatible(actual: pa.DataType, expected: pa.DataType, any_list_size: bool) -> bool:
    if actual.equals(expected):
        return True
    if pa.types.is_large_string(actual) and pa.types.is_string(expected):
        return True
    if pa.types.is_string_view(actual) and pa.types.is_string(expected):
        return True
    list_like = (pa.types.is_list(actual) or pa.types.is_large_list(actual)
                 or pa.types.is_fixed_size_list(actual))
    if list_like and pa.types.is_list(expected):
        if pa.types.is_fixed_size_list(actual) and not any_list_size:
            return False
        return _compatible(actual.value_type, expected.value_type, False)
    if pa.types.is_integer(actual) and pa.types.is_integer(expected):
        return True
    return False


def validate(table: pa.Table, schema: ArtifactSchema, where: str) -> pa.Table:
    """Check ``table`` against ``schema`` and return it in the canonical column order and types.

    Raises DataError naming ``where``, the column and the first offending row.
    """
    names = table.column_names
    for col in schema.columns:
        if col.required and col.name not in names:
            raise DataError(
                f"missing column for artifact '{schema.name}' (found columns: {', '.join(names)})",
                where=where, field=col.name,
            )
    known = {c.name for c in schema.columns}
    extra = [n for n in names if n not in known]
    if extra:
        raise DataError(
            f"unexpected column(s) {extra} for artifact '{schema.name}' "
            f"(allowed: {', '.join(sorted(known))})", where=where, field=extra[0],
        )
    arrays, fields = [], []
    for col in schema.columns:
        if col.name not in names:
            continue
        arr = table.column(col.name)
        any_size = col.name in schema.fixed_size_list_ok
        if not _compatible(arr.type, col.type, any_size):
            raise DataError(f"has type {arr.type}, expected {col.type}", where=where, field=col.name)
        if pa.types.is_fixed_size_list(arr.type) and any_size:
            target = arr.type  # keep the fixed size: it is the embedding dimension
        else:
            target = col.type
        if not arr.type.equals(target):
            try:
                arr = arr.cast(target)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise DataError(f"cannot cast {arr.type} to {target}: {e}", where=where, field=col.name) from e
        if not col.nullable and arr.null_count:
            row = _first_true(pc.is_null(arr))
            raise DataError("null value in a non-nullable column", where=where, row=row, field=col.name)
        if pa.types.is_list(target) or pa.types.is_fixed_size_list(target):
            flat = pc.list_flatten(arr)
            if flat.null_count:
                raise DataError("list contains a null element", where=where,
                                row=_first_null_in_list(arr), field=col.name)
        if col.nonempty:
            if pa.types.is_string(target):
                empty = pc.equal(pc.utf8_length(arr), 0)
            else:
                empty = pc.equal(pc.list_value_length(arr), 0)
            if pc.any(empty).as_py():
                raise DataError("empty value where one is required", where=where,
                                row=_first_true(empty), field=col.name)
        arrays.append(arr)
        fields.append(pa.field(col.name, target, nullable=col.nullable))
    out = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    for key in schema.unique:
        _check_unique(out.column(key), where, key)
    if schema is SEQUENCES and "timestamps" in out.column_names:
        _check_timestamps(out, where)
    return out


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int:
    idx = pc.indices_nonzero(pc.fill_null(mask, False).combine_chunks()
                             if isinstance(mask, pa.ChunkedArray) else pc.fill_null(mask, False))
    return int(idx[0].as_py()) if len(idx) else -1


def _first_null_in_list(arr: pa.ChunkedArray) -> int:
    arr = arr.combine_chunks()
    parents = pc.list_parent_indices(arr)
    nulls = pc.is_null(pc.list_flatten(arr))
    idx = pc.indices_nonzero(nulls)
    return int(parents[idx[0].as_py()].as_py()) if len(idx) else -1


def _check_unique(arr: pa.ChunkedArray, where: str, field_name: str) -> None:
    if pc.count_distinct(arr).as_py() == len(arr):
        return
    seen: dict = {}
    for i, v in enumerate(arr.to_pylist()):
        if v in seen:
            raise DataError(f"duplicate value {v!r} (first seen at row {seen[v]})",
                            where=where, row=i, field=field_name)
        seen[v] = i


def _check_timestamps(table: pa.Table, where: str) -> None:
    ts = table.column("timestamps")
    if ts.null_count == len(ts):
        return
    lens_i = pc.list_value_length(table.column("item_ids"))
    lens_t = pc.list_value_length(ts)
    bad = pc.and_(pc.is_valid(ts), pc.not_equal(lens_i, lens_t))
    if pc.any(bad).as_py():
        raise DataError("timestamps and item_ids have different lengths", where=where,
                        row=_first_true(bad), field="timestamps")


# items added to a run's catalog after training (serving's admin updates, the cold-start benchmark), relative
# to the run: written by ``serving/catalog.py``, read there and by the evaluation (``eval.added_items``)
CATALOG_UPDATES = "serve/catalog_updates.parquet"


def check_references(sequences: pa.Table, items: pa.Table, where: str) -> None:
    """Every item a sequence names must exist in the catalog."""
    flat = pc.list_flatten(sequences.column("item_ids"))
    known = pc.is_in(flat, value_set=items.column("item_id").combine_chunks())
    if pc.all(known).as_py():
        return
    pos = _first_true(pc.invert(known))
    parents = pc.list_parent_indices(sequences.column("item_ids"))
    row = int(parents[pos].as_py())
    missing = pc.filter(flat, pc.invert(known))
    raise DataError(
        f"sequence names {pc.count_distinct(missing).as_py()} item id(s) that are not in the catalog, "
        f"e.g. {missing[0].as_py()!r}", where=where, row=row, field="item_ids",
    )


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """embeddings table -> [n_items, dim] float32 (zero copy where possible)."""
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
