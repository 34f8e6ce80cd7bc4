"""The synthetic demo catalog: deterministic, product-like, with learnable structure, scalable."""

from collections import Counter

import numpy as np

from grlm_ray.core.config import SyntheticSource
from grlm_ray.stages.prepare.synthetic import generate


def src(**kw):
    return SyntheticSource(kind="synthetic", **kw)


def test_same_seed_same_data_other_seed_other_data():
    a_items, a_int = generate(src(seed=3))
    b_items, b_int = generate(src(seed=3))
    c_items, c_int = generate(src(seed=4))
    assert a_items.equals(b_items) and a_int.equals(b_int)
    assert not a_int["item_id"].equals(c_int["item_id"])


def test_items_are_product_like():
    items, _ = generate(src(num_items=200))
    rows = items.to_pylist()
    assert len({r["item_id"] for r in rows}) == 200
    for r in rows[:20]:
        assert r["title"] and r["brand"] in r["title"] and r["category"] in r["categories"]
        assert len(r["description"].split()) >= 6


def test_next_item_is_predictable_beyond_popularity():
    """The planted structure: the best 'previous item -> next item' rule beats the most popular item."""
    _, inter = generate(src(num_items=400, num_users=3000, seed=1))
    seqs = inter.groupby("user_id", sort=False)["item_id"].apply(list)
    pairs = Counter()
    for s in seqs:
        pairs.update(zip(s[:-1], s[1:]))
    best_next = {}
    for (a, b), n in pairs.items():
        if n > best_next.get(a, ("", 0))[1]:
            best_next[a] = (b, n)
    pop = inter["item_id"].value_counts().index[0]
    hit_rule = np.mean([best_next[s[-2]][0] == s[-1] for s in seqs])
    hit_pop = np.mean([pop == s[-1] for s in seqs])
    assert hit_rule > 0.3 and hit_rule > 5 * hit_pop


def test_scales_to_large_catalogs_quickly():
    items, inter = generate(src(num_items=100_000, num_users=20_000))
    assert items.num_rows == 100_000 and len(inter) > 20_000 * 4
