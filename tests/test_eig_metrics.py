"""EIG on a hand-built catalog and metrics on hand-computed cases."""

import math

import pytest

from grlm_ray.lib.eig import DIRECT, FILL, STRUCTURAL, TidIndex
from grlm_ray.lib.metrics import dhr_at_k, ndcg_at_k, recall_at_k, score_rankings, vr_at_k

CATALOG = {
    "a": ["shampoo", "hair", "gentle", "woman", "organic"],
    "b": ["shampoo", "hair", "volume", "man", "salon"],
    "c": ["lipstick", "lip", "matte", "woman", "vegan"],
    "d": ["shampoo", "hair", "gentle", "woman", "organic"],  # collides with a
    "e": ["mascara", "lash", "volume", "woman", "waterproof"],
}


@pytest.fixture
def index():
    return TidIndex(list(CATALOG), list(CATALOG.values()), fallback_order=["e", "c", "b", "a", "d"])


def test_exact_hit_wins_and_returns_the_collision_group(index):
    items, how = index.ground_one("shampoo hair gentle woman organic")
    assert [index.item_ids[i] for i in items] == ["a", "d"] and how == DIRECT
    assert index.is_valid(["lipstick", "lip", "matte", "woman", "vegan"])
    assert not index.is_valid("lipstick lip matte woman")


def test_structural_scores_decay_with_position(index):
    # term 0 'shampoo' (w=1) matches a,b,d; term 3 'man' (w=1/4) only b -> b wins
    items, scores = index.structural(["shampoo", "x", "y", "man"], 5)
    assert index.item_ids[items[0]] == "b" and scores[0] == pytest.approx(1 + 1 / 4)
    # 'volume' at position 0 (w=1) beats 'lipstick' at position 1 (w=1/2)
    items, scores = index.structural(["volume", "lipstick"], 5)
    assert [index.item_ids[i] for i in items] == ["b", "e", "c"] and list(scores) == [1.0, 1.0, 0.5]


def test_ties_break_by_catalog_order(index):
    items, scores = index.structural(["woman"], 5)
    assert [index.item_ids[i] for i in items] == ["a", "c", "d", "e"]


def test_exact_equality_by_default_substring_as_option():
    idx = TidIndex(["p", "q"], [["nail-art", "glitter"], ["nail", "polish"]])
    items, _ = idx.structural(["nail"], 5)
    assert [idx.item_ids[i] for i in items] == ["q"]
    sub = TidIndex(["p", "q"], [["nail-art", "glitter"], ["nail", "polish"]], match="substring")
    items, scores = sub.structural(["nail"], 5)
    assert [sub.item_ids[i] for i in items] == ["q", "p"] and list(scores) == pytest.approx([1.0, 0.8])
    items, scores = sub.structural(["x", "nail-art-kit"], 5)  # catalog term inside the generated one
    assert [sub.item_ids[i] for i in items] == ["p", "q"] and list(scores) == pytest.approx([0.4, 0.4])


def test_rank_is_always_k_long_beams_in_order_no_duplicates(index):
    g = index.rank(["lipstick lip matte woman vegan", "shampoo hair gentle woman organic", "zzz"], 5)
    assert g.items[:3] == ["c", "a", "d"] and g.grounded_by[:3] == [DIRECT] * 3
    assert len(g.items) == 5 and len(set(g.items)) == 5
    assert set(g.grounded_by[3:]) <= {STRUCTURAL, FILL}
    g2 = index.rank(["nothing matches", "at all"], 3)
    assert g2.items == ["e", "c", "b"] and g2.grounded_by == [FILL] * 3  # popularity fallback
    g3 = index.rank(["shampoo volume"], 2)
    assert g3.items[0] == "b" and g3.grounded_by[0] == STRUCTURAL


def test_metrics_hand_computed():
    ranked = ["x", "t", "y"]
    assert recall_at_k(ranked, "t", 1) == 0 and recall_at_k(ranked, "t", 2) == 1
    assert ndcg_at_k(ranked, "t", 5) == pytest.approx(1 / math.log2(3))
    assert ndcg_at_k(ranked, "x", 5) == 1.0 and ndcg_at_k(ranked, "z", 5) == 0.0
    assert vr_at_k([True, False, True, True], 2) == 0.5
    assert dhr_at_k(["direct", "structural", "fill", "direct"], 4) == 0.5
    rows = [
        {"domain": "a", "target_item_id": "t", "ranked_item_ids": ["t", "x"], "grounded_by": ["direct", "fill"],
         "beam_valid": [True, False]},
        {"domain": "b", "target_item_id": "t", "ranked_item_ids": ["x", "y"], "grounded_by": ["fill", "fill"],
         "beam_valid": [False, False]},
    ]
    m = score_rankings(rows, ks=(1, 2))
    assert m["overall"]["recall_at_1"] == 0.5 and m["overall"]["users"] == 2
    assert m["per_domain"]["a"]["ndcg_at_2"] == 1.0 and m["per_domain"]["b"]["recall_at_2"] == 0.0
    assert m["overall"]["vr_at_2"] == 0.25 and m["overall"]["dhr_at_1"] == 0.5


@pytest.mark.parametrize("decay", ["reciprocal", "none"])
@pytest.mark.parametrize("path", ["dict", "scan", "subsets"])
def test_structural_search_equals_brute_force_scoring(decay, path):
    """The subset search must give exactly the brute-force ranking (score desc, then catalog order)."""
    import numpy as np

    from grlm_ray.lib.eig import position_weights

    rng = np.random.default_rng(7)
    vocab = [f"w{i}" for i in range(25)]
    tids = [list(rng.choice(vocab, size=5, replace=False)) for _ in range(300)]
    idx = TidIndex([str(i) for i in range(300)], tids, decay=decay)
    idx.small_postings, idx.scan_postings = {"dict": (10**9, 10**9), "scan": (-1, 10**9), "subsets": (-1, -1)}[path]
    w = position_weights(5, decay)
    for _ in range(60):
        q = list(rng.choice(vocab + ["zz", "yy"], size=5, replace=True))
        brute = sorted(((-sum(w[j] for j, t in enumerate(q) if t in set(tid)), i) for i, tid in enumerate(tids)))
        brute = [(i, -s) for s, i in brute if s < 0][:15]
        items, scores = idx.structural(q, 15)
        assert [int(i) for i in items] == [i for i, _ in brute], q
        assert np.allclose(scores, [s for _, s in brute])


def test_a_long_unconstrained_generation_ranks_exactly_without_enumerating_subsets():
    """An unconstrained beam that never wrote its end marker has up to max_new_tokens terms: 30 matched
    positions must not become 2^30 subsets (it ran out of memory on Beauty); the ranking stays exact."""
    import numpy as np

    from grlm_ray.lib.eig import position_weights

    rng = np.random.default_rng(3)
    vocab = [f"w{i}" for i in range(40)]
    tids = [list(rng.choice(vocab, size=5, replace=False)) for _ in range(400)]
    idx = TidIndex([str(i) for i in range(400)], tids)
    idx.small_postings = idx.scan_postings = -1  # the path that used to enumerate subsets
    q = list(rng.choice(vocab, size=30, replace=True))
    w = position_weights(32)
    brute = sorted(((-sum(w[j] for j, t in enumerate(q) if t in set(tid)), i) for i, tid in enumerate(tids)))
    brute = [(i, -s) for s, i in brute if s < 0][:10]
    items, scores = idx.structural(q, 10)
    assert [int(i) for i in items] == [i for i, _ in brute]
    assert np.allclose(scores, [s for _, s in brute])
