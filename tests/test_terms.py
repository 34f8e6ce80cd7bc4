"""Term normalization and collision resolution (hand-built cases and the authors' Beauty TIDs)."""

import pytest

from grlm_ray.lib.terms import base_form, colliding_items, resolve_collisions, text_words


def test_base_form_and_text_words():
    assert base_form("Brushes") == "brush" and base_form("women") == "woman"
    assert base_form("anti-aging") == "anti-aging"  # hyphenated compounds kept
    assert text_words("The Curls & Waves Shampoo, 8 oz for Women") == ["curl", "wave", "shampoo", "woman"]


def test_collision_group_keeps_first_and_distinguishes_others_by_their_own_words():
    ids = ["a", "b", "c", "d"]
    tids = [["shampoo", "wash", "hair", "woman", "gentle"]] * 3 + [["soap", "wash", "hair", "man", "gentle"]]
    texts = ["Gentle shampoo", "Gentle shampoo with argan oil", "Gentle shampoo with tea tree", "Soap"]
    new, changed, rep = resolve_collisions(ids, tids, texts)
    assert new[0] == tids[0] and changed == [False, True, True, False]
    assert len({tuple(t) for t in new}) == 4 and rep.colliding_items_after == 0
    assert rep.colliding_items_before == 3 and rep.groups_before == 1 and rep.by_text_word == 2
    assert new[1][0] == "shampoo" and new[2][0] == "shampoo"  # the type term is never replaced
    # the most frequent term (wash/hair/gentle appear in both TIDs) was swapped for the item's own word
    assert {"argan", "oil"} & set(new[1]) and {"tea", "tree"} & set(new[2])


def test_items_without_text_fall_back_to_catalog_terms():
    ids = ["a", "b", "c"]
    tids = [["mug", "coffee", "ceramic"]] * 2 + [["cup", "tea", "glass"]]
    new, changed, rep = resolve_collisions(ids, tids, ["", "", ""])
    assert new[0] != new[1] and rep.by_catalog_term == 1 and rep.colliding_items_after == 0
    assert new[1][0] == "mug" and set(new[1]) - set(tids[0]) <= {"cup", "tea", "glass"}
    with pytest.raises(ValueError, match="vocabulary too small"):
        resolve_collisions(["a", "b"], [["mug"], ["mug"]], ["", ""])


def test_authors_beauty_tids_go_from_440_colliding_items_to_zero(shared_data, tmp_path):
    from grlm_ray.core.config import load_config
    from grlm_ray.stages.prepare import prepare
    from grlm_ray.core.storage import Store
    from grlm_ray.lib.terms import resolve_terms_table

    prepare(load_config(None, [f"run.root={tmp_path}", "run.name=b", f"data.base_dir={shared_data}",
                               "data.domains={beauty: {kind: bundle, dir: beauty}}"]))
    store = Store(str(tmp_path))
    terms = store.read_table("b/prepare/terms.parquet")
    items = store.read_table("b/prepare/items.parquet")
    assert colliding_items([tuple(t) for t in terms.column("terms").to_pylist()]) == 440
    out, rep = resolve_terms_table(terms, items)
    print(f"\nauthors' Beauty TIDs: {rep.colliding_items_before} colliding items in {rep.groups_before} groups "
          f"-> {rep.colliding_items_after} after resolution ({rep.changed_items} changed)")
    assert rep.colliding_items_before == 440 and rep.colliding_items_after == 0
    assert len({tuple(t) for t in out.column("terms").to_pylist()}) == out.num_rows
    assert all(len(t) == 5 for t in out.column("terms").to_pylist())
    assert sum(s.endswith("+dedup") for s in out.column("source").to_pylist()) == rep.changed_items


def test_terms_table_resolution_matches_the_list_resolution_with_and_without_collisions():
    """``resolve_terms_table`` finds colliding TIDs in Arrow and returns early when there are none: the same
    TIDs, flags and report as ``resolve_collisions`` on plain lists, on random tables of both kinds."""
    import random

    import pyarrow as pa

    from grlm_ray.core.schemas import ITEMS, TERMS
    from grlm_ray.lib.terms import resolve_terms_table

    rng = random.Random(5)
    words = ["mug", "cup", "blue", "red", "tall", "steel", "glass", "big"]
    for trial in range(40):
        distinct = trial % 2 == 0
        n = rng.randint(1, 30 if distinct else 12)  # 3 x 8 two-term TIDs: room to resolve 12 items
        ids = [f"i{k}" for k in range(n)]
        tids = ([[f"w{k}", rng.choice(words)] for k in range(n)] if distinct
                else [[rng.choice(words[:3]), rng.choice(words)] for _ in range(n)])
        texts = [" ".join(rng.sample(words, 3)) for _ in range(n)]
        items = pa.Table.from_pylist([{"item_id": i, "category": "c", "title": t, "description": "", "brand": "",
                                       "categories": []} for i, t in zip(ids, texts)], schema=ITEMS.arrow)
        table = pa.Table.from_pylist([{"item_id": i, "terms": t, "raw": "", "valid": True, "source": "llm"}
                                      for i, t in zip(ids, tids)], schema=TERMS.arrow)
        out, rep = resolve_terms_table(table, items)
        want, changed, want_rep = resolve_collisions(ids, tids, [t + " " for t in texts])
        assert out.column("terms").to_pylist() == want
        assert out.column("source").to_pylist() == ["llm+dedup" if c else "llm" for c in changed]
        assert rep.as_dict() == want_rep.as_dict()
        assert distinct <= (rep.colliding_items_before == 0)


def test_provided_domains_keep_their_own_tids_in_a_joint_catalog(tmp_path):
    """``sft.provided_domains``: a joint catalog where one domain keeps its source's TIDs (Sports: the authors',
    few titles) and the others take CTG's; a listed domain without provided TIDs, an unknown domain, or the
    option with sft.terms=provided are refused, naming the field."""
    import pyarrow as pa

    from grlm_ray.core.config import load_config
    from grlm_ray.core.errors import ConfigError, DataError
    from grlm_ray.core.schemas import TERMS
    from grlm_ray.core.storage import StageContext, Store
    from grlm_ray.stages.sft import _keep_provided

    doms = "{a: {kind: synthetic}, b: {kind: synthetic}}"
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=j", "data.mode=joint", f"data.domains={doms}",
                             "sft.provided_domains=[b]"])

    def table(rows, source):
        return pa.table({"item_id": [r[0] for r in rows], "terms": [r[1] for r in rows], "raw": [""] * len(rows),
                         "valid": [True] * len(rows), "source": [source] * len(rows)}, schema=TERMS.arrow)

    ctg = table([("a/1", ["x", "y"]), ("a/2", ["x", "z"]), ("b/1", ["p", "q"]), ("b/2", ["p", "r"])], "lexical")
    store = Store(str(tmp_path))
    ctx = StageContext(store, "j", "sft")
    with pytest.raises(DataError, match="prepare wrote no provided TIDs"):
        _keep_provided(ctx, cfg, ctg)
    store.write_table("j/prepare/terms.parquet", table([("a/1", ["m", "n"]), ("b/1", ["u", "v"]), ("b/2", ["u", "w"])],
                                                         "provided"))
    got, kept = _keep_provided(ctx, cfg, ctg)
    assert kept == {"b": 2}
    assert {r["item_id"]: (r["terms"], r["source"]) for r in got.to_pylist()} == {
        "a/1": (["x", "y"], "lexical"), "a/2": (["x", "z"], "lexical"),
        "b/1": (["u", "v"], "provided"), "b/2": (["u", "w"], "provided")}
    store.write_table("j/prepare/terms.parquet", table([("a/1", ["m", "n"])], "provided"))
    with pytest.raises(DataError, match=r"no provided TIDs for domain\(s\) \['b'\]"):
        _keep_provided(ctx, cfg, ctg)
    with pytest.raises(ConfigError, match="sft.provided_domains: \\['c'\\] not in data.domains"):
        load_config(None, ["data.mode=joint", f"data.domains={doms}", "sft.provided_domains=[c]"])
    with pytest.raises(ConfigError, match="every domain already does"):
        load_config(None, ["data.mode=joint", f"data.domains={doms}", "sft.provided_domains=[b]", "sft.terms=provided"])


def test_compression_of_a_joint_catalog_compresses_the_provided_domains_own_tids(tmp_path):
    """``compress.source: ctg`` with ``sft.provided_domains``: the vocabulary compressed is the one the model trains
    on (CTG's terms, the listed domains' own TIDs in their place), its key names them, and the SFT data made from a
    compressed table keeps those compressed TIDs (it does not put the uncompressed ones back)."""
    import pyarrow as pa

    from grlm_ray.core.config import load_config
    from grlm_ray.core.registry import stage_key
    from grlm_ray.core.schemas import ITEMS, TERMS
    from grlm_ray.core.storage import Store, read_manifest
    from grlm_ray.stages.compress import compress

    doms = "{a: {kind: synthetic}, b: {kind: synthetic}}"
    over = [f"run.root={tmp_path}", "run.name=j", "data.mode=joint", f"data.domains={doms}", "compress.source=ctg",
            "compress.ks=[3]", "tracking.enabled=false"]
    cfg = load_config(None, over + ["sft.provided_domains=[b]"])

    def table(rows, source):
        return pa.table({"item_id": [r[0] for r in rows], "terms": [r[1] for r in rows], "raw": [""] * len(rows),
                         "valid": [True] * len(rows), "source": [source] * len(rows)}, schema=TERMS.arrow)

    store = Store(str(tmp_path))
    ids = ["a/1", "a/2", "b/1", "b/2"]
    store.write_table("j/prepare/items.parquet", pa.table(
        {"item_id": ids, "category": ["c"] * 4, "title": [f"{i} title" for i in ids], "description": [""] * 4,
         "brand": [""] * 4, "categories": pa.array([[]] * 4, pa.list_(pa.string()))}), ITEMS)
    store.write_table("j/ctg/terms.parquet", table([("a/1", ["red", "shoe"]), ("a/2", ["red", "boot"]),
                                                    ("b/1", ["ctg", "only"]), ("b/2", ["more", "word"])], "lexical"))
    store.write_table("j/prepare/terms.parquet", table([("a/1", ["x", "y"]), ("b/1", ["bike", "wheel"]),
                                                        ("b/2", ["bike", "helmet"])], "provided"))
    res = compress(cfg)
    assert res["info"]["provided_tids_kept"] == {"b": 2}
    raw = res["info"]["sweep"][0]
    assert raw["vocab"] == 6  # red shoe boot + bike wheel helmet: CTG's 4 b terms are not in the vocabulary
    k3 = store.read_table("j/compress/k3/terms.parquet").to_pylist()
    words = {t for r in k3 for t in r["terms"]}
    assert not words & {"ctg", "only", "more", "word", "x", "y"}  # (re-resolution may add title words)
    assert read_manifest(store, "j", "compress")["config_hash"].startswith(stage_key(cfg, "compress") + "-provided-b")
    assert stage_key(load_config(None, over), "compress") == stage_key(cfg, "compress")  # the suffix tells them apart
