import pyarrow as pa
import pytest

from grlm_ray.core.errors import DataError
from grlm_ray.core.schemas import ITEMS, SEQUENCES, EMBEDDINGS, check_references, validate


def items(**over):
    base = {"item_id": ["1", "2"], "category": ["a", "a"], "title": ["t1", ""], "description": ["", ""],
            "brand": ["", ""], "categories": [["x"], []]}
    base.update(over)
    return pa.table(base)


def test_valid_items_pass_and_come_back_canonical():
    out = validate(items(), ITEMS, "items.parquet")
    assert out.column_names == ["item_id", "category", "title", "description", "brand", "categories"]
    assert out.schema.field("categories").type == pa.list_(pa.string())


def test_missing_column_names_file_and_field():
    t = items().drop_columns(["title"])
    with pytest.raises(DataError) as e:
        validate(t, ITEMS, "cat/items.parquet")
    assert "cat/items.parquet" in str(e.value) and "field 'title'" in str(e.value)


def test_duplicate_item_id_names_the_row():
    with pytest.raises(DataError, match=r"row 1, field 'item_id': duplicate value '1'"):
        validate(items(item_id=["1", "1"]), ITEMS, "f")


def test_empty_id_and_null_text_are_rejected_with_row():
    with pytest.raises(DataError, match=r"row 1, field 'item_id': empty"):
        validate(items(item_id=["1", ""]), ITEMS, "f")
    with pytest.raises(DataError, match=r"row 0, field 'title': null"):
        validate(items(title=[None, "x"]), ITEMS, "f")


def test_unexpected_and_mistyped_columns():
    with pytest.raises(DataError, match="unexpected column"):
        validate(items(extra=[1, 2]), ITEMS, "f")
    with pytest.raises(DataError, match="field 'title': has type int64"):
        validate(items(title=[1, 2]), ITEMS, "f")


def test_sequences_lists_and_timestamps():
    ok = pa.table({"user_id": ["u"], "item_ids": [["1", "2"]], "timestamps": pa.array([[1, 2]], pa.list_(pa.int64()))})
    validate(ok, SEQUENCES, "s")
    bad = ok.set_column(2, "timestamps", pa.array([[1]], pa.list_(pa.int64())))
    with pytest.raises(DataError, match="row 0, field 'timestamps'"):
        validate(bad, SEQUENCES, "s")
    with pytest.raises(DataError, match="row 1, field 'item_ids': list contains a null"):
        validate(pa.table({"user_id": ["u", "v"], "item_ids": [["1"], ["2", None]],
                           "timestamps": pa.nulls(2, pa.list_(pa.int64()))}), SEQUENCES, "s")


def test_sequence_naming_unknown_item_is_an_error_with_row():
    seqs = pa.table({"user_id": ["u", "v"], "item_ids": [["1"], ["2", "9"]]})
    with pytest.raises(DataError, match=r"row 1, field 'item_ids'.*'9'"):
        check_references(seqs, items(), "seq.parquet")


def test_embeddings_keep_their_fixed_size():
    arr = pa.FixedSizeListArray.from_arrays(pa.array([0.1, 0.2, 0.3, 0.4], pa.float32()), 2)
    out = validate(pa.table({"item_id": ["a", "b"], "embedding": arr}), EMBEDDINGS, "e")
    assert out.schema.field("embedding").type.list_size == 2
