"""The serving catalog as data (no Ray, no servers): Arrow-backed items and TIDs that behave as the
mappings serving reads, versions that share their columns, and a pickled size without a dict per item."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pytest

from grlm_ray.core.schemas import ITEMS, SEQUENCES, TARGETS, TERMS
from grlm_ray.core.run import Run
from grlm_ray.core.storage import Store
from grlm_ray.serving.catalog import read_catalog, save_updates


def _run(tmp_path, n: int = 6):
    store = Store(str(tmp_path))
    ids = [f"i{k}" for k in range(n)]
    store.write_table("r/prepare/items.parquet", pa.Table.from_pylist(
        [{"item_id": i, "category": "Beauty", "title": f"Title {i}", "description": f"about {i}", "brand": "b",
          "categories": ["Beauty", "Hair"]} for i in ids], schema=ITEMS.arrow), ITEMS)
    store.write_table("r/sft/terms.parquet", pa.Table.from_pylist(
        [{"item_id": i, "terms": ["shampoo", f"w{k}"], "raw": "", "valid": True, "source": "lexical"}
         for k, i in enumerate(reversed(ids))], schema=TERMS.arrow), TERMS)  # terms in their own order
    store.write_table("r/prepare/sequences.parquet", pa.Table.from_pylist(
        [{"user_id": "u1", "item_ids": ["i1", "i2", "i1", "i3"], "timestamps": None},
         {"user_id": "u2", "item_ids": ["i2", "i1", "i4"], "timestamps": None}], schema=SEQUENCES.arrow), SEQUENCES)
    store.write_table("r/prepare/targets.parquet", pa.Table.from_pylist(
        [{"user_id": "u1", "split": "test", "domain": "x", "position": 3, "target_item_id": "i3"},
         {"user_id": "u2", "split": "test", "domain": "x", "position": 2, "target_item_id": "i4"}],
        schema=TARGETS.arrow), TARGETS)
    return store, ids


def test_catalog_reads_as_mappings_in_catalog_order_and_versions_share_nothing_mutable(tmp_path):
    store, ids = _run(tmp_path)
    cat = read_catalog(Run(str(tmp_path), "r", store=store))
    assert cat.item_ids == list(reversed(ids))  # the terms table's order: grounding ties follow it
    assert cat.tids["i0"] == ["shampoo", "w5"] and cat.tids.values()[0] == ["shampoo", "w0"]
    assert cat.items["i2"] == {"item_id": "i2", "category": "Beauty", "title": "Title i2", "description": "about i2",
                               "brand": "b", "categories": ["Beauty", "Hair"]}
    assert "i3" in cat.items and "zz" not in cat.tids and cat.items.get("zz", {}) == {} and len(cat.items) == 6
    assert cat.popular == ["i1", "i2"]  # targets held out: i1 twice, i2 twice (ties by id), i3 / i4 never
    new = {"item_id": "n1", "category": "Beauty", "title": "New", "description": "", "brand": "",
           "categories": [], "terms": ["serum", "face"]}
    v1 = cat.with_items([new])
    assert v1.version == 1 and v1.item_ids[-1] == "n1" and v1.tids["n1"] == ["serum", "face"]
    assert v1.items["n1"]["title"] == "New" and v1.added == ["n1"] and v1.added_in == {"n1": 1}
    assert "n1" not in cat.tids and len(cat.tids) == 6  # the old version is unchanged
    with pytest.raises(ValueError, match="already in the catalog"):
        v1.with_items([dict(new)])
    with pytest.raises(ValueError, match="not after"):
        v1.with_items([dict(new, item_id="n2")], version=1)
    back = pickle.loads(pickle.dumps(v1, protocol=5))  # what a replica pulls: columns, the index rebuilt
    assert back.item_ids == v1.item_ids and back.tids.values() == v1.tids.values()
    assert back.items["n1"] == v1.items["n1"] and back.items.items() == v1.items.items()


def test_saved_updates_restore_the_same_versions(tmp_path):
    from grlm_ray.core.config import load_config

    store, _ = _run(tmp_path)
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=r"])
    run = Run.of(cfg)
    cat = read_catalog(run)
    row = {"item_id": "n1", "category": "Beauty", "title": "New", "description": "d", "brand": "",
           "categories": ["Beauty"], "terms": ["serum", "face"]}
    v2 = cat.with_items([row]).with_items([dict(row, item_id="n2", terms=["serum", "eye"])])
    save_updates(run, v2)
    again = read_catalog(run)
    assert again.version == 2 and again.added_in == {"n1": 1, "n2": 2}
    assert again.item_ids == v2.item_ids and again.tids.values() == v2.tids.values()
    assert again.items.values() == v2.items.values()
