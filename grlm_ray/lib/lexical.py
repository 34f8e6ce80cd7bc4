"""Statistical CTG (``ctg.method=lexical``): CTG's rules for a Term ID without an LLM.

From each item's own text, its embedding neighbours and statistics over the whole catalog:

1. **product type first**: the candidate words of the item's title (and categories) scored by how often
   the word is the *head* of a title across the catalog (the last content word before ``,`` / `` - `` /
   ``for`` / ``with`` ...: "Gentle Tea Tree **Shampoo** for Men, 8 oz"), the item's own head winning ties;
2. **shared terms next**: the item's words that its neighbours also use (most neighbours first), so similar
   items share vocabulary at the same positions;
3. **distinguishing terms last** (``distinct_terms``, 1-2): the item's words no neighbour has, rarest in the
   catalog first (brand, line or shade names);
4. exactly N distinct lowercase base-form words; never stop words, units, numbers or markup; short texts
   are filled from the item's other words, then its neighbours' shared words, then its category.

``lead="brand"`` puts the item's brand before its type: the first word of its ``brand`` field, else its
title's first word when that word is brand-like across the catalog (it opens at least two titles and at
least half of the titles it appears in); an item without one keeps the type first.

Deterministic and single-process: every catalog statistic is counted once (a few seconds for 100k items).
It is also CTG's repair path for LLM answers that do not validate.
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from grlm_ray.lib.terms import STOPWORDS, text_words

# a title's first segment ends at punctuation or at a connecting word: its last content word is the head
_SEGMENT = re.compile(r"[,;:|()\[\]!?/]|\s[-\u2013\u2014]\s|\s(?:for|with|by|from|in|of|and|&|plus|includes?)\s",
                      re.I)
UNITS = frozenset(
    "oz ml fl liter litre liters litres gallon gal kg mg mcg cm mm lb lbs pc pcs pk ea qty dozen sq ft yd mah "
    "watt volt inch ounce gram pound count ct pack".split())
MARKUP = frozenset("amp reg quot nbsp trade tm lt gt br li ul div span http https www com html".split())
NOISE = STOPWORDS | UNITS | MARKUP


@dataclass(frozen=True)
class ItemWords:
    head: str | None  # the head of the title's first segment (None: no content word)
    lead: str | None  # the brand field's first word, else the title's first candidate word
    title: tuple[str, ...]  # title candidate words, in order
    other: tuple[str, ...]  # categories, brand, description words not in the title, in order

    @property
    def all(self) -> frozenset[str]:
        """Every word of the item (built when asked: a stored set per item took ~1 KB, a GB at 1M items)."""
        return frozenset(self.title) | frozenset(self.other)


def words(text: str) -> list[str]:
    """Distinct candidate words of ``text`` in order (``terms.text_words``): no stop words, units or markup."""
    return text_words(text or "", NOISE)


def item_words(item: Mapping[str, Any], max_desc_chars: int = 300) -> ItemWords:
    title = item.get("title") or ""
    first = _SEGMENT.split(title, maxsplit=1)[0]
    seg = words(first)
    head = seg[-1] if seg else None
    tw = words(title)
    brand = words(item.get("brand") or "")
    lead = brand[0] if brand else (tw[0] if tw and title.lower().lstrip().startswith(tw[0][:3]) else None)
    extra: list[str] = []
    cats = item.get("categories") or []
    for text in [*reversed(list(cats)), item.get("brand") or "", (item.get("description") or "")[:max_desc_chars]]:
        for w in words(text):
            if w not in tw and w not in extra:
                extra.append(w)
    # one string object per distinct word across the catalog, not one per item that uses it
    return ItemWords(head and sys.intern(head), lead and sys.intern(lead), tuple(map(sys.intern, tw)),
                     tuple(map(sys.intern, extra)))


class LexicalTermWriter:
    """Term IDs for a catalog: ``tid(item_id)`` -> N terms. ``neighbors``: item id -> neighbour ids (best
    first; empty or missing for ``context: none``)."""

    def __init__(self, items: Sequence[Mapping[str, Any]], neighbors: Mapping[str, Sequence[str]] | None,
                 num_terms: int, num_neighbors: int = 5, distinct_terms: int = 2,
                 lead: str = "type") -> None:
        if num_terms < 2:
            raise ValueError("a TID needs at least 2 terms")
        if lead not in ("type", "brand"):
            raise ValueError(f"lead must be 'type' or 'brand', got {lead!r}")
        self.lead = lead
        self.n = num_terms
        self.k = num_neighbors
        self.distinct = max(1, min(distinct_terms, num_terms - 1))
        self.items: dict[str, Mapping[str, Any]] = {}
        self.words: dict[str, Any] = {}
        self.neighbors: dict[str, list[str]] = {}
        self.df: Counter = Counter()
        self.heads: Counter = Counter()
        self.leads: Counter = Counter()  # how many titles each word opens (or brands it is the first word of)
        # when set, the only words a TID takes while it can be filled from them (then any word of the item)
        self.vocabulary: frozenset[str] | None = None
        self.add_items(items, neighbors)

    def add_items(self, items: Sequence[Mapping[str, Any]],
                  neighbors: Mapping[str, Sequence[str]] | None = None) -> None:
        """Items (and their neighbours) into the catalog statistics; an item id already there is replaced."""
        self.remove_items([str(it["item_id"]) for it in items if str(it["item_id"]) in self.items])
        for it in items:
            i = str(it["item_id"])
            w = item_words(it)
            # what the rules read later; the rest of the row (its description) is not kept
            self.items[i] = {"brand": it.get("brand") or "", "category": it.get("category") or ""}
            self.words[i] = w
            self.df.update(set(w.title) | set(w.other))
            if w.head:
                self.heads[w.head] += 1
            if w.lead:
                self.leads[w.lead] += 1
        # the first k neighbours only (the caller's string objects are kept, not copied)
        self.neighbors.update({str(i): [str(j) for j in v[: self.k]] for i, v in (neighbors or {}).items()})
        self.n_items = max(1, len(self.items))

    def remove_items(self, item_ids: Sequence[str]) -> None:
        """Items out of the statistics again (their counts subtracted)."""
        for i in item_ids:
            if self.items.pop(i, None) is None:
                continue
            w = self.words.pop(i)
            self.df.subtract(set(w.title) | set(w.other))
            if w.head:
                self.heads[w.head] -= 1
            if w.lead:
                self.leads[w.lead] -= 1
            self.neighbors.pop(i, None)
        self.n_items = max(1, len(self.items))

    def idf(self, w: str) -> float:
        return math.log((1 + self.n_items) / (1 + self.df[w]))

    def typeness(self, w: str) -> float:
        """How type-like a word is: the share of its titles in which it is the head, times how often."""
        h = self.heads[w]
        return h / (self.df[w] + 1) * math.log1p(h)

    def brand(self, item_id: str) -> str | None:
        """The item's brand word (``lead='brand'``): its brand field's first word, else its title's first word
        when that word opens >= 2 titles and at least half of the titles it is in; None otherwise."""
        w = self.words[item_id]
        if not w.lead:
            return None
        if self.items[item_id].get("brand"):
            return w.lead
        n = self.leads[w.lead]
        return w.lead if n >= 2 and n * 2 >= self.df[w.lead] else None

    def explain(self, item_id: str) -> dict[str, Any]:
        """The TID with the role of each term: type, shared (with neighbour counts), distinct, fill."""
        w = self.words[item_id]
        vocab = self.vocabulary
        allowed = (lambda c: True) if vocab is None else (lambda c: c in vocab)
        everything = list(dict.fromkeys(w.title + w.other))
        cands = [c for c in everything if allowed(c)]
        title = tuple(c for c in w.title if allowed(c))
        nbrs = [self.words[j] for j in self.neighbors.get(item_id, [])[: self.k] if j in self.words]
        nb_all = [nb.all for nb in nbrs]
        shared = {c: sum(c in a for a in nb_all) for c in everything}
        # 1. the type: most type-like title word (the item's own head first among equals), else categories
        brand = self.brand(item_id) if self.lead == "brand" else None
        brand = brand if brand is not None and allowed(brand) else None
        pool = [c for c in title if c != brand] or [c for c in cands if c != brand]
        type_word = None
        if pool:
            type_word = max(pool, key=lambda c: (self.typeness(c) + (1e-6 if c == w.head else 0.0),
                                                 shared[c], -pool.index(c)))
        if type_word is None and nbrs:  # no words of its own: the neighbours' most common head
            heads = Counter(nb.head for nb in nbrs if nb.head)
            type_word = heads.most_common(1)[0][0] if heads else None
        terms: list[str] = [brand] if brand else []
        roles: list[str] = ["brand"] if brand else []
        if type_word:
            terms.append(type_word)
            roles.append("type")
        rest = [c for c in cands if c not in terms]
        # 2. words shared with neighbours, most shared first, then title order
        n_shared = self.n - len(terms) - self.distinct
        common = sorted((c for c in rest if shared[c] > 0), key=lambda c: (-shared[c], cands.index(c)))
        for c in common[:max(0, n_shared)]:
            terms.append(c)
            roles.append("shared")
        # 3. distinguishing words: the fewest neighbours have them (none, ideally); rarest in the catalog first
        # the nearest neighbour decides first: a word it lacks tells the item from its closest sibling
        # (a near-duplicate shares every word the other neighbours lack: "waterproof" vs "washable")
        nearest = nb_all[0] if nb_all else frozenset()
        own = sorted((c for c in rest if c not in terms),
                     key=lambda c: (c in nearest, shared[c], -self.idf(c), cands.index(c)))
        for c in own:
            if len(terms) >= self.n:
                break
            terms.append(c)
            roles.append("distinct" if shared[c] == 0 else "shared")
        # 4. fill: the item's remaining words, its neighbours' words, its category, fixed words
        fill = [c for c in common if c not in terms] + [c for c in cands if c not in terms]
        # neighbours' words most of them use (the shared vocabulary), not one neighbour's own brand or line
        nb_count = Counter(c for nb in nbrs for c in set(nb.title) if c not in terms and allowed(c))
        fill += sorted(nb_count, key=lambda c: (-nb_count[c], self.idf(c), c))
        fill += [c for c in words(str(self.items[item_id].get("category") or "")) if allowed(c)]
        # a vocabulary too small for N terms: the item's own other words after all
        fill += [c for c in everything if c not in fill] + ["item", "product", "goods", "article", "thing", "ware"]
        for c in fill:
            if len(terms) >= self.n:
                break
            if c not in terms:
                terms.append(c)
                roles.append("fill")
        order = _importance_order(terms, roles)
        return {"terms": [terms[j] for j in order], "roles": [roles[j] for j in order],
                "shared": {c: shared.get(c, 0) for c in terms}}

    def tid(self, item_id: str) -> list[str]:
        return self.explain(item_id)["terms"]

    def tids(self, item_ids: Sequence[str] | None = None) -> dict[str, list[str]]:
        ids = list(self.items) if item_ids is None else [str(i) for i in item_ids]
        return {i: self.tid(i) for i in ids}


def _importance_order(terms: list[str], roles: list[str]) -> list[int]:
    """(brand,) type, shared, fill, then the distinguishing words last (CTG's order: what the item is first)."""
    rank = {"brand": -1, "type": 0, "shared": 1, "fill": 2, "distinct": 3}
    return sorted(range(len(terms)), key=lambda j: (rank[roles[j]], j))
