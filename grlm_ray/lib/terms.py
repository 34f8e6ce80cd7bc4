"""Term IDs: normalizing terms and making every item's TID distinct.

A TID is an ordered list of N terms (category/type, function, features, audience, selling point).
Items that end with the same TID are a *collision group*. ``resolve_collisions`` keeps the first item
of each group (catalog order) and, for each other item, swaps the least informative term — the one
most frequent across the catalog, never the first (the type) — for a word that sets the item apart:
a word from its own title / description (rarest first), else a catalog term that makes the TID unique.
Works on any terms table (LLM-made or the authors' provided TIDs).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pyarrow as pa

from grlm_ray.core.errors import DataError
from grlm_ray.core.schemas import TERMS

_WORD = re.compile(r"[a-z][a-z]+(?:-[a-z]+)*")
STOPWORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or the to with without this that these "
    "those your you our we they their them he she his her not no all any each more most other some such "
    "only own same so than too very can will just should now new set pack pcs piece pieces size oz ml fl "
    "inch inches count ct lb lbs one two three four five six seven eight nine ten over under about into out "
    "per via ounce ounces gram grams pound pounds model item product brand inc ltd value".split())


@lru_cache(maxsize=200_000)
def base_form(word: str) -> str:
    """Lowercase base form (lemma) of one word; hyphenated compounds are kept whole."""
    import simplemma  # offline lemmatizer; its data ships in the wheel

    w = word.strip().lower()
    if "-" in w:
        return w
    return simplemma.lemmatize(w, lang="en").lower()


def text_words(text: str, stop: frozenset[str] = STOPWORDS) -> list[str]:
    """Distinct candidate words of a text, in order: alphabetic, >= 3 letters, not in ``stop``, base form."""
    out: list[str] = []
    for m in _WORD.finditer(text.lower()):
        w = m.group(0)
        if len(w) < 3 or w in stop:
            continue
        b = base_form(w)
        if b not in stop and len(b) >= 3 and b not in out:
            out.append(b)
    return out


@dataclass
class CollisionReport:
    items: int
    colliding_items_before: int
    groups_before: int
    colliding_items_after: int
    changed_items: int
    by_text_word: int
    by_catalog_term: int
    examples: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def colliding_items(tids: list[tuple[str, ...]]) -> int:
    counts = Counter(tids)
    return sum(n for n in counts.values() if n > 1)


def _first_free(tid: list[str], words: list[str], slots: list[int],
                taken: set[tuple[str, ...]]) -> tuple[str, ...] | None:
    """The first TID made by putting one of ``words`` into one of ``slots`` that no item uses yet."""
    for word in words:
        if word in tid:
            continue
        for j in slots:
            cand = tuple(tid[:j] + [word] + tid[j + 1:])
            if cand not in taken:
                return cand
    return None


def resolve_collisions(
    item_ids: list[str], tids: list[list[str]], texts: list[str], *, keep_examples: int = 10
) -> tuple[list[list[str]], list[bool], CollisionReport]:
    """Return (new tids, changed flags, report). ``texts[i]`` is item i's title + description."""
    keyed = [tuple(t) for t in tids]
    before = colliding_items(keyed)
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, k in enumerate(keyed):
        groups[k].append(i)
    term_df = Counter(t for k in keyed for t in set(k))
    taken = set(keyed)
    # catalog terms, most common first: a shared word is a better identifier word than a rare one
    fallback_terms = [t for t, _ in term_df.most_common()]
    out = [list(t) for t in tids]
    changed = [False] * len(tids)
    n_text = n_catalog = 0
    examples: list[dict] = []
    for key, members in groups.items():
        if len(members) < 2:
            continue
        for i in members[1:]:
            tid = list(key)
            # positions ordered by how little they tell: most frequent term first; never position 0
            positions = sorted(range(1, len(tid)), key=lambda j: (-term_df[tid[j]], -j)) or [0]
            own_words = sorted(text_words(texts[i]), key=lambda w: term_df.get(w, 0))  # rarest first
            new, by_text = None, True
            # the item's own words replace the least informative term; catalog terms may go anywhere
            for words, slots in ((own_words, positions[:1]), (fallback_terms, positions)):
                new = _first_free(tid, words, slots, taken)
                if new is not None:
                    break
                by_text = False
            if new is None:  # only possible for a one-term vocabulary; say so rather than loop
                raise ValueError(f"cannot make the TID of item {item_ids[i]!r} distinct: vocabulary too small")
            n_text += by_text
            n_catalog += not by_text
            taken.add(new)
            out[i] = list(new)
            changed[i] = True
            if len(examples) < keep_examples:
                examples.append({"item_id": item_ids[i], "before": list(key), "after": list(new),
                                 "kept_by": item_ids[members[0]]})
    report = CollisionReport(
        items=len(tids), colliding_items_before=before, groups_before=sum(1 for m in groups.values() if len(m) > 1),
        colliding_items_after=colliding_items([tuple(t) for t in out]), changed_items=sum(changed),
        by_text_word=n_text, by_catalog_term=n_catalog, examples=examples)
    return out, changed, report


def resolve_terms_table(terms: pa.Table, items: pa.Table) -> tuple[pa.Table, CollisionReport]:
    """Apply ``resolve_collisions`` to a terms table, using the items table for the item texts.

    Changed rows keep their ``raw`` text and get ``source`` suffixed with ``+dedup``.
    """
    import pyarrow.compute as pc

    # colliding TIDs found in Arrow (a TID's terms joined by a separator no term holds)
    keys = pc.binary_join(terms.column("terms"), "\x1f")
    counts = pc.value_counts(keys)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if not len(repeated):  # nothing to resolve: no Python object per item (seconds at 1M items)
        n = terms.num_rows
        return terms.cast(TERMS.arrow), CollisionReport(items=n, colliding_items_before=0, groups_before=0,
                                                        colliding_items_after=0, changed_items=0,
                                                        by_text_word=0, by_catalog_term=0)
    # the texts of colliding items only: every title + description as Python strings was a GB at 1M items
    shared = terms.column("item_id").filter(pc.is_in(keys, value_set=repeated))
    del keys, counts, repeated
    ids = terms.column("item_id").to_pylist()
    tids = terms.column("terms").to_pylist()
    text_of = {r["item_id"]: f"{r['title']} {r['description']}" for r in items.select(
        ["item_id", "title", "description"]).filter(pc.is_in(items.column("item_id"), value_set=shared)).to_pylist()}
    new, changed, report = resolve_collisions(ids, tids, [text_of.get(i, "") for i in ids])
    source = [s + "+dedup" if c else s for s, c in zip(terms.column("source").to_pylist(), changed)]
    out = terms.set_column(terms.column_names.index("terms"), "terms", pa.array(new, pa.list_(pa.string())))
    out = out.set_column(out.column_names.index("source"), "source", pa.array(source, pa.string()))
    return out.cast(TERMS.arrow), report


def keep_provided(terms: pa.Table, provided: pa.Table | None, domains: list[str], domain_of: Any,
                  where: str = "sft.provided_domains") -> tuple[pa.Table, dict[str, int]]:
    """``domains``' items take their source's own TIDs (``provided``: prepare/terms.parquet) in place of
    ``terms``' rows (``sft.provided_domains``: the SFT data, and the vocabulary compression compresses);
    returns the table and the items kept per domain. A listed domain without provided TIDs is an error naming it."""
    import pyarrow.compute as pc

    if provided is None:
        raise DataError(f"{where}={domains}: prepare wrote no provided TIDs (a bundle with with_terms: true has "
                        "them)", field="sft.provided_domains")
    doms = pa.array([domain_of(i) for i in provided.column("item_id").to_pylist()], pa.string())
    keep = pc.is_in(doms, value_set=pa.array(domains, pa.string()))
    provided = provided.filter(keep)
    kept = Counter(doms.filter(keep).to_pylist())
    missing = [d for d in domains if not kept[d]]
    if missing:
        raise DataError(f"{where}: no provided TIDs for domain(s) {missing} (their source has none: a bundle with "
                        "with_terms: true has them)", field="sft.provided_domains")
    rest = terms.filter(pc.invert(pc.is_in(terms.column("item_id"), value_set=provided.column("item_id"))))
    return pa.concat_tables([rest, provided.select(rest.column_names).cast(rest.schema)]), dict(kept)
