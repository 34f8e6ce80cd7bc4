"""A deterministic, product-like demo catalog with behaviour a model can learn.

Items: category, product type, brand, two attributes, an audience, a title and a description.
Users: each prefers one category. A session starts from a popular item of that category, then each
next item is (with the configured probabilities) the *co-purchase partner* of the previous one (e.g. a
shampoo's matching conditioner of the same brand), another item of the same type, or a popular item of
the preferred category (rarely of another). The partner structure is what makes the next item
predictable; popularity alone cannot find it. Everything is vectorized, so 1M items take seconds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from grlm_ray.core.config import SyntheticSource
from grlm_ray.core.schemas import ITEMS

# category -> product types; type k's co-purchase partner is type (k + 1) % n within the category.
CATALOG: dict[str, list[str]] = {
    "Beauty": ["shampoo", "conditioner", "lipstick", "lip liner", "mascara", "eyeliner", "face serum",
               "moisturizer", "nail polish", "nail remover"],
    "Sports": ["running shoes", "running socks", "yoga mat", "yoga block", "water bottle", "bottle cage",
               "tennis racket", "tennis balls", "bike helmet", "bike light"],
    "Toys": ["puzzle", "puzzle mat", "doll", "dollhouse", "race car", "race track", "building blocks",
             "block storage box", "board game", "card sleeves"],
    "Kitchen": ["frying pan", "spatula", "coffee grinder", "coffee filters", "chef knife", "knife sharpener",
                "teapot", "tea infuser", "blender", "blender cups"],
    "Pet": ["dog food", "dog bowl", "cat litter", "litter scoop", "dog leash", "dog collar", "aquarium",
            "aquarium filter", "bird cage", "bird seed"],
    "Office": ["notebook", "gel pens", "desk lamp", "led bulb", "stapler", "staples", "monitor stand",
               "cable organizer", "printer paper", "ink cartridge"],
}
ATTRIBUTES: dict[str, list[str]] = {
    "Beauty": ["organic", "vegan", "hydrating", "matte", "waterproof", "fragrance-free", "long-lasting",
               "sulfate-free", "volumizing", "gentle"],
    "Sports": ["lightweight", "breathable", "non-slip", "durable", "insulated", "reflective", "cushioned",
               "foldable", "adjustable", "quick-dry"],
    "Toys": ["wooden", "colorful", "educational", "magnetic", "remote-controlled", "glow-in-the-dark",
             "washable", "stackable", "musical", "giant"],
    "Kitchen": ["nonstick", "stainless", "ceramic", "electric", "dishwasher-safe", "cast-iron", "bamboo",
                "insulated", "compact", "heavy-duty"],
    "Pet": ["grain-free", "chew-proof", "odor-control", "adjustable", "orthopedic", "natural", "silent",
            "washable", "large-breed", "hypoallergenic"],
    "Office": ["ergonomic", "recycled", "refillable", "wireless", "dimmable", "heavy-duty", "compact",
               "acid-free", "adjustable", "premium"],
}
AUDIENCES = ["women", "men", "kids", "teens", "beginners", "professionals", "travelers", "seniors",
             "families", "students"]
SELLING_POINTS = ["award-winning formula", "lifetime warranty", "best seller", "eco-friendly packaging",
                  "dermatologist tested", "made in small batches", "ships ready to use", "gift-ready box"]
_SYLLABLES = ["lu", "ra", "ko", "vi", "sa", "ne", "mo", "ta", "zen", "pri", "fa", "do", "qi", "bel", "or"]


MAX_BRANDS_PER_CATEGORY = 300  # well below the 15^2 + 15^3 distinct 2-3 syllable names


def _brand_names(rng: np.random.Generator, n: int) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        k = int(rng.integers(2, 4))
        name = "".join(rng.choice(_SYLLABLES, size=k)).capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


_ZIPF_SYLLABLES = ["ba", "ce", "di", "fo", "gu", "ha", "je", "ki", "lo", "mu", "na", "pe", "ri", "so", "tu",
                   "va", "we", "xi", "yo", "zu", "bra", "cle", "dri", "flo", "gra", "kro", "pla", "sti", "tra",
                   "vel", "mar", "ton", "ser", "lin", "dex", "por", "qua", "ren", "sol", "tix"]
COMMON_WORDS = 3_000  # the head of the vocabulary every domain shares (colours, sizes, "set", "pack", ...)


def _word(k: int) -> str:
    """The k-th word of the synthetic vocabulary: distinct for every k, short for small k (as frequent
    words are), letters only."""
    base = len(_ZIPF_SYLLABLES)
    k += base  # at least two syllables
    out = []
    while k:
        k, d = divmod(k, base)
        out.append(_ZIPF_SYLLABLES[d])
    return "".join(reversed(out))


def _zipf_sampler(n: int, s: float, rng: np.random.Generator):
    cdf = np.cumsum(1.0 / np.power(np.arange(1, n + 1, dtype=np.float64), s))
    cdf /= cdf[-1]
    return lambda size: np.searchsorted(cdf, rng.random(size), side="right").clip(0, n - 1)


def _zipf_items(src: SyntheticSource, rng: np.random.Generator) -> tuple:
    """Text that looks like a real catalog at any size: each item has a product type (one per ~100 items,
    Zipf-sized), a brand, and a title of ~12 words — brand, words drawn half from its type's own
    vocabulary and half from the domain's Zipf-distributed vocabulary (a shared common head plus
    domain words; size ~ 12 * n^0.6, Heaps' law), the type's name, sometimes an audience. Vectorized
    sampling; strings are joined once per item."""
    n = src.num_items
    n_types = max(10, n // 100)
    n_brands = max(4, n // 25)
    v_domain = int(12 * n ** 0.6)
    domain_base = COMMON_WORDS + (src.seed % 1000) * 10_000_000  # a block of words per domain (seed)
    vocab = np.concatenate([np.arange(COMMON_WORDS), domain_base + np.arange(v_domain)])
    draw_word = _zipf_sampler(len(vocab), 1.05, rng)
    type_idx = _zipf_sampler(n_types, 0.9, rng)(n)
    brand_idx = _zipf_sampler(n_brands, 1.0, rng)(n)
    # each type: a name (a domain word) and 24 characteristic words, Zipf within the type
    type_name = domain_base + v_domain + np.arange(n_types)  # past the sampled block: names are distinct
    type_words = vocab[draw_word(n_types * 24)].reshape(n_types, 24)
    draw_local = _zipf_sampler(24, 0.8, rng)
    n_words = 3 + rng.poisson(6, n).clip(0, 14)
    n_desc = 12 + rng.poisson(14, n)
    total = int(n_words.sum() + n_desc.sum())
    local = rng.random(total) < 0.5
    picks = np.where(local, type_words[np.repeat(type_idx, n_words + n_desc), draw_local(total)],
                     vocab[draw_word(total)])
    audience = np.where(rng.random(n) < 0.3, rng.integers(0, len(AUDIENCES), n), -1)
    words: dict[int, str] = {}

    def w(k: int) -> str:
        got = words.get(k)
        if got is None:
            got = words[k] = _word(int(k))
        return got

    brand_names = [w(domain_base + 9_000_000 + b).capitalize() for b in range(n_brands)]
    ids, titles, descs, brands, cats_col = [], [], [], [], []
    off = 0
    for i in range(n):
        nt, nd = int(n_words[i]), int(n_desc[i])
        tw = [w(k) for k in dict.fromkeys(picks[off:off + nt].tolist())]  # a title names a word once
        dw = [w(k) for k in picks[off + nt:off + nt + nd].tolist()]
        off += nt + nd
        t = w(int(type_name[type_idx[i]]))
        b = brand_names[brand_idx[i]]
        title = f"{b} {' '.join(x.capitalize() for x in tw)} {t.capitalize()}"
        if audience[i] >= 0:
            title += f" for {AUDIENCES[audience[i]].capitalize()}"
        ids.append(str(i + 1))
        titles.append(title)
        descs.append(f"{' '.join(dw).capitalize()}.")
        brands.append(b)
        cats_col.append([src.category, t.capitalize()])
    items = pa.table({
        "item_id": ids, "category": pa.array([src.category] * n, pa.string()), "title": titles,
        "description": descs, "brand": brands, "categories": pa.array(cats_col, pa.list_(pa.string())),
        "source_id": pa.nulls(n, pa.string()),
    }, schema=ITEMS.arrow)
    return items, np.zeros(n, np.int64), type_idx.astype(np.int64), brand_idx.astype(np.int64), 1, n_types, n_brands


def _templated_items(src: SyntheticSource, rng: np.random.Generator) -> tuple:
    """The demo's text: a few product types and attributes per category, one title template."""
    cats = list(CATALOG)[: min(src.num_categories, len(CATALOG))]
    n_items, n_types = src.num_items, len(next(iter(CATALOG.values())))
    n_brands = min(MAX_BRANDS_PER_CATEGORY, max(4, n_items // (len(cats) * 12)))
    brands = {c: _brand_names(rng, n_brands) for c in cats}

    cat_idx = np.arange(n_items) % len(cats)
    type_idx = rng.integers(0, n_types, n_items)
    brand_idx = rng.integers(0, n_brands, n_items)
    a1 = rng.integers(0, 10, n_items)
    a2 = (a1 + rng.integers(1, 10, n_items)) % 10  # distinct from a1
    aud = rng.integers(0, len(AUDIENCES), n_items)
    sell = rng.integers(0, len(SELLING_POINTS), n_items)

    # --- items table
    ids, titles, descs, brand_col, cat_col, cats_col = [], [], [], [], [], []
    for i in range(n_items):
        c = cats[cat_idx[i]]
        t = CATALOG[c][type_idx[i]]
        b = brands[c][brand_idx[i]]
        x1, x2 = ATTRIBUTES[c][a1[i]], ATTRIBUTES[c][a2[i]]
        au = AUDIENCES[aud[i]]
        ids.append(str(i + 1))
        titles.append(f"{b} {x1.capitalize()} {t.title()} for {au.capitalize()} - Model {i + 1}")
        descs.append(f"A {x1}, {x2} {t} by {b}, designed for {au}. {SELLING_POINTS[sell[i]].capitalize()}.")
        brand_col.append(b)
        cat_col.append(c)
        cats_col.append([c, t.title()])
    items = pa.table({
        "item_id": ids, "category": cat_col, "title": titles, "description": descs, "brand": brand_col,
        "categories": pa.array(cats_col, pa.list_(pa.string())), "source_id": pa.nulls(n_items, pa.string()),
    }, schema=ITEMS.arrow)
    return items, cat_idx, type_idx, brand_idx, len(cats), n_types, n_brands


def generate(src: SyntheticSource) -> tuple[pa.Table, pd.DataFrame]:
    """Return (items table, interactions frame) for the synthetic source; same seed, same data."""
    rng = np.random.default_rng(src.seed)
    n_items = src.num_items
    if src.text == "zipf":
        items, cat_idx, type_idx, brand_idx, n_cats, n_types, n_brands = _zipf_items(src, rng)
    else:
        items, cat_idx, type_idx, brand_idx, n_cats, n_types, n_brands = _templated_items(src, rng)
    popularity = 1.0 / np.power(rng.permutation(n_items) + 1.0, 0.8)
    cats = list(range(n_cats))

    # --- co-purchase partner: an item of the partner type in the same category, same brand if any
    group = cat_idx * n_types + type_idx  # (category, type) group id
    partner_group = cat_idx * n_types + (type_idx + 1) % n_types
    by_group = np.argsort(group, kind="stable")
    g_sorted = group[by_group]
    g_start = np.searchsorted(g_sorted, np.arange(len(cats) * n_types), side="left")
    g_end = np.searchsorted(g_sorted, np.arange(len(cats) * n_types), side="right")
    brand_group = group * n_brands + brand_idx
    bg_order = np.argsort(brand_group, kind="stable")
    bg_sorted = brand_group[bg_order]
    want_bg = partner_group * n_brands + brand_idx
    bs, be = np.searchsorted(bg_sorted, want_bg, "left"), np.searchsorted(bg_sorted, want_bg, "right")
    has_same_brand = be > bs
    pick_b = bg_order[np.minimum(bs + (rng.random(n_items) * np.maximum(be - bs, 1)).astype(np.int64),
                                 len(bg_order) - 1)]
    ps, pe = g_start[partner_group], g_end[partner_group]
    has_any = pe > ps
    pick_any = by_group[np.minimum(ps + (rng.random(n_items) * np.maximum(pe - ps, 1)).astype(np.int64),
                                   n_items - 1)]
    partner = np.where(has_same_brand, pick_b, np.where(has_any, pick_any, np.arange(n_items)))

    # --- popularity sampling within a category
    cat_items = [np.flatnonzero(cat_idx == k) for k in range(len(cats))]
    cat_cdf = [np.cumsum(popularity[ix]) for ix in cat_items]

    def sample_in_category(cat_of_user: np.ndarray) -> np.ndarray:
        out = np.empty(len(cat_of_user), dtype=np.int64)
        for k in range(len(cats)):
            m = cat_of_user == k
            if m.any():
                u = rng.random(int(m.sum())) * cat_cdf[k][-1]
                out[m] = cat_items[k][np.searchsorted(cat_cdf[k], u, side="right").clip(0, len(cat_items[k]) - 1)]
        return out

    n_users = src.num_users
    pref = rng.integers(0, len(cats), n_users)
    extra = max(src.mean_length - 4.0, 1.0)
    lengths = np.minimum(4 + rng.geometric(1.0 / extra, n_users), 50)
    max_len = int(lengths.max())
    seq = np.empty((n_users, max_len), dtype=np.int64)
    seq[:, 0] = sample_in_category(pref)
    for step in range(1, max_len):
        prev = seq[:, step - 1]
        r = rng.random(n_users)
        nxt = sample_in_category(np.where(rng.random(n_users) < 0.1, rng.integers(0, len(cats), n_users), pref))
        same = r < src.p_complement + src.p_same_type
        g = group[prev]
        s, e = g_start[g], g_end[g]
        same_type = by_group[np.minimum(s + (rng.random(n_users) * (e - s)).astype(np.int64), n_items - 1)]
        nxt = np.where(same, same_type, nxt)
        nxt = np.where(r < src.p_complement, partner[prev], nxt)
        seq[:, step] = nxt
    mask = np.arange(max_len)[None, :] < lengths[:, None]
    user_rows, pos = np.nonzero(mask)
    start = rng.integers(1_300_000_000, 1_400_000_000, n_users)
    gaps = rng.integers(3_600, 30 * 86_400, (n_users, max_len)).cumsum(axis=1)
    interactions = pd.DataFrame({
        "user_id": pd.Series([f"u{u + 1}" for u in user_rows], dtype=str),
        "item_id": pd.Series((seq[user_rows, pos] + 1).astype(str), dtype=str),
        "timestamp": pd.Series(start[user_rows] + gaps[user_rows, pos], dtype="Int64"),
        "order": pd.Series(np.arange(len(user_rows)), dtype="int64"),
    })
    return items, interactions
