"""Bring-your-own tables (bad input cases) and the joint / cross-domain merges, on hand-built data."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grlm_ray.core.config import load_config
from grlm_ray.core.errors import DataError
from grlm_ray.stages.prepare import prepare
from grlm_ray.core.storage import Store

ITEMS_CSV = "item_id,title,description,brand,category,categories\n" + "\n".join(
    f"i{k},Item {k},desc {k},b,cat,x|y" for k in range(1, 7)) + "\n"


def interactions_csv(rows):
    return "user_id,item_id,timestamp\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n"


def base_rows():
    # three users with 3 items each; with k_core=0 nothing is filtered
    return [("a", "i1", 1), ("a", "i2", 2), ("a", "i3", 3), ("b", "i2", 5), ("b", "i4", 6), ("b", "i5", 7),
            ("c", "i1", 1), ("c", "i6", 9), ("c", "i3", 9)]


def byo_config(tmp_path, items="items.csv", inter="inter.csv", *extra):
    return load_config(None, [
        f"run.root={tmp_path / 'runs'}", "run.name=t", f"data.base_dir={tmp_path}", "data.k_core=0",
        f"data.domains={{shop: {{kind: byo, items: {items}, interactions: {inter}}}}}", *extra])


def write(tmp_path, items=ITEMS_CSV, rows=None, inter_bytes=None):
    (tmp_path / "items.csv").write_text(items) if isinstance(items, str) else (tmp_path / "items.csv").write_bytes(items)
    (tmp_path / "inter.csv").write_bytes(inter_bytes if inter_bytes is not None
                                         else interactions_csv(rows or base_rows()).encode())


def read(tmp_path, name, run="t"):
    return Store(str(tmp_path / "runs")).read_table(f"{run}/prepare/{name}")


def test_byo_csv_round_trip(tmp_path):
    write(tmp_path)
    prepare(byo_config(tmp_path))
    seqs = {r["user_id"]: r["item_ids"] for r in read(tmp_path, "sequences.parquet").to_pylist()}
    assert seqs == {"a": ["i1", "i2", "i3"], "b": ["i2", "i4", "i5"], "c": ["i1", "i6", "i3"]}
    items = read(tmp_path, "items.parquet")
    assert items.num_rows == 6  # cold items stay in a BYO catalog
    assert items.to_pylist()[0]["categories"] == ["x", "y"]


def test_missing_or_misnamed_column_is_named(tmp_path):
    write(tmp_path, items=ITEMS_CSV.replace("item_id,", "itemid,", 1))
    with pytest.raises(DataError, match=r"items\.csv, field 'item_id': missing column.*found: itemid"):
        prepare(byo_config(tmp_path))


def test_duplicate_item_ids_name_both_lines(tmp_path):
    write(tmp_path, items=ITEMS_CSV + "i2,again,,,,\n")
    with pytest.raises(DataError, match=r"items\.csv, row 8, field 'item_id': duplicate item id 'i2' \(also at row 3\)"):
        prepare(byo_config(tmp_path))


def test_unknown_items_are_reported_or_raise(tmp_path):
    write(tmp_path, rows=base_rows() + [("a", "nope", 4)])
    m = prepare(byo_config(tmp_path))
    rej = read(tmp_path, "rejects.parquet").to_pylist()
    assert [(r["line"], r["field"], r["value"]) for r in rej] == [(11, "item_id", "nope")]
    assert m["info"]["rejects"] == {"dropped: unknown item id": 1}
    write(tmp_path, rows=base_rows() + [("a", "nope", 4)])
    with pytest.raises(DataError, match=r"inter\.csv, line 11, field 'item_id': unknown item id"):
        prepare(byo_config(tmp_path, "items.csv", "inter.csv", "data.invalid_rows=error", "run.name=t2"))


def test_empty_titles_kept_and_counted(tmp_path):
    write(tmp_path, items=ITEMS_CSV.replace("Item 2", "").replace("Item 5", ""))
    m = prepare(byo_config(tmp_path))
    assert m["info"]["domains"]["shop"]["items_with_empty_title"] == 2
    assert read(tmp_path, "items.parquet").num_rows == 6


def test_non_utf8_bytes_are_repaired_and_reported(tmp_path):
    write(tmp_path, items=ITEMS_CSV.replace("Item 3", "Caf\xe9 3").encode("latin-1"))
    prepare(byo_config(tmp_path))
    items = {r["item_id"]: r for r in read(tmp_path, "items.parquet").to_pylist()}
    assert items["i3"]["title"] == "Caf\ufffd 3"
    rej = read(tmp_path, "rejects.parquet").to_pylist()
    assert rej[0]["action"] == "repaired" and rej[0]["line"] == 4 and rej[0]["field"] == "title"


def test_users_with_fewer_than_three_interactions_are_dropped_and_counted(tmp_path):
    write(tmp_path, rows=base_rows() + [("d", "i1", 1), ("d", "i2", 2)])
    m = prepare(byo_config(tmp_path))
    assert "d" not in read(tmp_path, "sequences.parquet").column("user_id").to_pylist()
    assert m["info"]["domains"]["shop"]["users_below_min_interactions_dropped"] == 1


def test_bad_timestamps_and_iso_dates(tmp_path):
    rows = [("a", "i1", "2020-01-03"), ("a", "i2", "2020-01-01"), ("a", "i3", "2020-01-02"),
            ("a", "i4", "yesterday")] + base_rows()[3:]
    write(tmp_path, rows=rows)
    prepare(byo_config(tmp_path))
    seqs = {r["user_id"]: r for r in read(tmp_path, "sequences.parquet").to_pylist()}
    assert seqs["a"]["item_ids"] == ["i2", "i3", "i1"]
    rej = read(tmp_path, "rejects.parquet").to_pylist()
    assert [(r["line"], r["reason"]) for r in rej] == [(5, "unparseable timestamp")]


def test_parquet_inputs_and_column_mapping(tmp_path):
    pq.write_table(pa.table({"sku": ["p1", "p2", "p3"], "name": ["x", "y", "z"]}), tmp_path / "it.parquet")
    pq.write_table(pa.table({"uid": ["a"] * 3, "sku": ["p3", "p1", "p2"], "ts": [3, 1, 2]}), tmp_path / "ev.parquet")
    cfg = load_config(None, [
        f"run.root={tmp_path / 'runs'}", "run.name=t", f"data.base_dir={tmp_path}", "data.k_core=0",
        "data.domains={shop: {kind: byo, items: it.parquet, interactions: ev.parquet, "
        "item_columns: {item_id: sku, title: name, description: null, brand: null, category: null, categories: null}, "
        "interaction_columns: {user_id: uid, item_id: sku, timestamp: ts}}}"])
    prepare(cfg)
    assert read(tmp_path, "sequences.parquet").to_pylist()[0]["item_ids"] == ["p1", "p2", "p3"]


def _two_domains(tmp_path):
    for dom, rows in {
        "a": [("x", "i1", 10), ("x", "i2", 30), ("x", "i3", 50), ("y", "i1", 1), ("y", "i2", 2), ("y", "i3", 3),
              ("z", "i4", 1), ("z", "i5", 2), ("z", "i6", 3)],
        "b": [("x", "i1", 20), ("x", "i2", 40), ("x", "i3", 60), ("x", "i4", 70), ("y", "i5", 5), ("y", "i6", 6),
              ("y", "i1", 7)],
    }.items():
        (tmp_path / f"items_{dom}.csv").write_text(ITEMS_CSV)
        (tmp_path / f"inter_{dom}.csv").write_text(interactions_csv(rows))


def merge_config(tmp_path, mode):
    return load_config(None, [
        f"run.root={tmp_path / 'runs'}", f"run.name={mode}", f"data.base_dir={tmp_path}", "data.k_core=0",
        f"data.mode={mode}",
        "data.domains={a: {kind: byo, items: items_a.csv, interactions: inter_a.csv}, "
        "b: {kind: byo, items: items_b.csv, interactions: inter_b.csv}}"])


@pytest.mark.ray
def test_joint_catalog_namespaces_items_and_users(tmp_path, ray_local):
    _two_domains(tmp_path)
    prepare(merge_config(tmp_path, "joint"))
    items = read(tmp_path, "items.parquet", "joint").column("item_id").to_pylist()
    assert len(items) == 12 and items[0] == "a/i1" and "b/i6" in items
    seqs = {r["user_id"]: r["item_ids"] for r in read(tmp_path, "sequences.parquet", "joint").to_pylist()}
    assert seqs["a/x"] == ["a/i1", "a/i2", "a/i3"] and seqs["b/x"] == ["b/i1", "b/i2", "b/i3", "b/i4"]
    assert "b/z" not in seqs and "b/y" in seqs
    t = read(tmp_path, "targets.parquet", "joint").to_pylist()
    assert {(r["user_id"], r["domain"], r["split"], r["target_item_id"]) for r in t if r["user_id"] == "b/x"} == {
        ("b/x", "b", "test", "b/i4"), ("b/x", "b", "valid", "b/i3")}


@pytest.mark.ray
def test_cross_domain_merges_chronologically_with_one_target_per_domain(tmp_path, ray_local):
    _two_domains(tmp_path)
    m = prepare(merge_config(tmp_path, "cross_domain"))
    seqs = {r["user_id"]: r["item_ids"] for r in read(tmp_path, "sequences.parquet", "cross_domain").to_pylist()}
    # z is only in a; y has 3 in each domain; x interleaves by time
    assert set(seqs) == {"x", "y"}
    assert seqs["x"] == ["a/i1", "b/i1", "a/i2", "b/i2", "a/i3", "b/i3", "b/i4"]
    assert seqs["y"] == ["a/i1", "a/i2", "a/i3", "b/i5", "b/i6", "b/i1"]
    t = {(r["user_id"], r["domain"], r["split"]): (r["target_item_id"], r["position"])
         for r in read(tmp_path, "targets.parquet", "cross_domain").to_pylist()}
    assert t[("x", "a", "test")] == ("a/i3", 4) and t[("x", "a", "valid")] == ("a/i2", 2)
    assert t[("x", "b", "test")] == ("b/i4", 6) and t[("x", "b", "valid")] == ("b/i3", 5)
    assert len(t) == 8 and m["info"]["merge"]["users_in_both_domains"] == 2


def test_joint_domains_reading_the_same_files_or_without_text_are_refused_before_any_work(tmp_path):
    """Two domains over the same files (every item twice under two namespaces), and a domain with no item text
    while CTG is to write the TIDs: named by `grlm validate`'s checks and by every pipeline run before work."""
    from grlm_ray.flows.pipeline import check_inputs, run_pipeline
    from grlm_ray.core.errors import ConfigError
    from grlm_ray.core.registry import upstream

    for name, titles in (("a", [f"Toy {k}" for k in range(6)]), ("b", [""] * 6)):
        d = tmp_path / name
        d.mkdir()
        pq.write_table(pa.table({"item_id": list(range(1, 7)), "title": titles,
                                 "categories": pa.array([[]] * 6, pa.list_(pa.string()))}), d / "items.parquet")
        pq.write_table(pa.table({"user_id": [1, 2, 3], "item_ids": [[1, 2, 3], [2, 4, 5], [1, 6, 3]]}),
                       d / "sequences.parquet")

    def joint(domains: str, *extra: str):
        return load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=j", f"data.base_dir={tmp_path}",
                                  "data.mode=joint", f"data.domains={{{domains}}}", *extra])

    twice = joint("x: {kind: bundle, dir: a}, y: {kind: bundle, dir: ./a/}, z: {kind: bundle, dir: b}",
                  "sft.terms=provided")
    (problem,) = check_inputs(twice, upstream("train", twice))
    assert problem.startswith("data.domains.y: reads the same files as data.domains.x") and "twice" in problem
    textless = joint("x: {kind: bundle, dir: a}, z: {kind: bundle, dir: b}", "sft.terms=ctg")
    (problem,) = check_inputs(textless, upstream("train", textless))
    assert problem.startswith("data.domains.z: no item of") and "sft.terms=provided" in problem
    with pytest.raises(ConfigError, match="data.domains.z: no item"):
        run_pipeline(textless, stages=upstream("train", textless))
    assert not (tmp_path / "runs" / "j" / "prepare").exists()  # refused before any work
    # the bundle's own TIDs need no text: CTG is not in the pipeline, nothing to refuse
    provided = joint("x: {kind: bundle, dir: a}, z: {kind: bundle, dir: b}", "sft.terms=provided")
    assert check_inputs(provided, upstream("train", provided)) == []
