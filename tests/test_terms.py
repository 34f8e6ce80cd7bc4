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
