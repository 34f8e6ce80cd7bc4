"""Elastic Identifier Grounding: a generated TID -> real catalog items.

1. direct map: the exact TID string -> its item(s) (a collision group returns all, in catalog order);
2. structural map, when there is no exact hit: score(item) = sum_j w_j * [generated term j is one of
   the item's terms], w_j decaying with position j (default 1/(j+1), as the reference); the highest
   score wins, ties broken by catalog order (deterministic).

A ranked list for K: beams in order, each grounded (direct: its whole group; structural: its best item
not yet listed), duplicates dropped, then each beam's further structural candidates, then the fallback
order (popularity when given, else catalog order) — always exactly K items.

Scoring uses an inverted index (term -> item indices, CSR arrays); a query touches only the items that
share a term with it. ``match='substring'`` reproduces the reference's matching (equal terms score 1.0,
a term containing the other 0.8, summed over the item's matching terms); exact equality is the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Sequence

import numpy as np

DIRECT, STRUCTURAL, FILL = "direct", "structural", "fill"


def tid_text(terms: Sequence[str]) -> str:
    """The canonical text of a TID: its terms joined by single spaces (terms never contain spaces)."""
    return " ".join(terms)


def parse_generated(text: str) -> list[str]:
    return [t for t in text.replace(",", " ").lower().split() if t]


def position_weights(n: int, decay: Literal["reciprocal", "none"] = "reciprocal") -> np.ndarray:
    if decay == "none":
        return np.ones(n, dtype=np.float64)
    return 1.0 / (np.arange(n, dtype=np.float64) + 1.0)


@lru_cache(maxsize=4096)
def _levels(ws: tuple[float, ...]) -> list[tuple[float, list[int]]]:
    """Non-empty subsets of positions with weights ``ws`` (bit masks), grouped by equal weight sum, highest
    sum first (cached: a query's matched weights repeat across queries)."""
    m = len(ws)
    masks = np.arange(1, 1 << m)
    bits = (masks[:, None] >> np.arange(m)[None, :]) & 1
    sums = bits @ np.asarray(ws)
    order = np.argsort(-sums, kind="stable")
    out: list[tuple[float, list[int]]] = []
    for mask, v in zip(masks[order].tolist(), sums[order].tolist()):
        if out and abs(out[-1][0] - v) < 1e-12:
            out[-1][1].append(mask)
        else:
            out.append((v, [mask]))
    return out


@dataclass
class Grounding:
    items: list[str]
    grounded_by: list[str]
    scores: list[float]
    beams: list[int | None]  # the index of the beam each item was grounded from (None: the fallback fill)


class TidIndex:
    """Built once per catalog (or catalog update); queries are read-only and thread-safe."""

    def __init__(self, item_ids: Sequence[str], tids: Sequence[Sequence[str]], *,
                 decay: Literal["reciprocal", "none"] = "reciprocal",
                 match: Literal["exact", "substring"] = "exact",
                 fallback_order: Sequence[str] | None = None, max_terms: int = 32) -> None:
        if len(item_ids) != len(tids):
            raise ValueError("item_ids and tids differ in length")
        self.item_ids = np.asarray(list(item_ids), dtype=object)
        self.n = len(self.item_ids)
        self.match = match
        self.weights = position_weights(max_terms, decay)
        self.direct: dict[str, np.ndarray] = {}
        groups: dict[str, list[int]] = {}
        vocab: dict[str, int] = {}
        rows: list[int] = []
        cols: list[int] = []
        for i, tid in enumerate(tids):
            groups.setdefault(tid_text(tid), []).append(i)
            for t in set(tid):
                rows.append(vocab.setdefault(t, len(vocab)))
                cols.append(i)
        self.direct = {k: np.asarray(v, dtype=np.int64) for k, v in groups.items()}
        self.vocab = vocab
        self.vocab_list = list(vocab)
        order = np.lexsort((np.asarray(cols), np.asarray(rows)))  # by term, then item (catalog order)
        r = np.asarray(rows, dtype=np.int64)[order]
        self.postings = np.asarray(cols, dtype=np.int64)[order]
        self.indptr = np.zeros(len(vocab) + 1, dtype=np.int64)
        np.add.at(self.indptr, r + 1, 1)
        self.indptr = np.cumsum(self.indptr)
        pos = {it: k for k, it in enumerate(self.item_ids)}
        fb = [pos[i] for i in fallback_order if i in pos] if fallback_order is not None else []
        seen = set(fb)
        self.fallback = np.asarray(fb + [i for i in range(self.n) if i not in seen], dtype=np.int64)
        self._substr = lru_cache(maxsize=65536)(self._substring_terms)
        self._plists: dict[int, list[int]] = {}
        self._psets: dict[int, frozenset[int]] = {}
        self._pset_items = 0
        if len(self.postings) <= self.eager_set_postings:  # small catalogs: every set up front (Beauty: 60k)
            for k in range(len(self.vocab_list)):
                self._pset(k)
        self._lens: list[int] = np.diff(self.indptr).tolist()  # posting list lengths, by term id
        self._wlist: list[float] = self.weights.tolist()

    # ---------------------------------------------------------------- single TID
    def _term_ids(self, term: str) -> list[tuple[int, float]]:
        """(vocabulary id, similarity) of the catalog terms a generated term matches."""
        if self.match == "exact":
            k = self.vocab.get(term)
            return [] if k is None else [(k, 1.0)]
        return self._substr(term)

    def _substring_terms(self, term: str) -> list[tuple[int, float]]:
        # the reference's rule: equal -> 1.0; one contains the other -> 0.8 (a scan of the vocabulary,
        # cached per term)
        out = []
        for k, t in enumerate(self.vocab_list):
            if t == term:
                out.append((k, 1.0))
            elif term in t or t in term:
                out.append((k, 0.8))
        return out

    # Exact-mode strategy by the total length of the query's posting lists (all give the same ranking,
    # checked against brute force in the tests): a dict loop when they are tiny (no set-up at all; <= 96
    # postings was fastest on Beauty), else the
    # subset search (benchmarks/results/scale.json: p50 30 us vs 110 us for a vectorized scan and 330 us for
    # the dict loop at 27k items on realistic TIDs); the scan for long generations (too many subsets) or
    # when ``scan_postings`` is raised.
    small_postings = 96
    scan_postings = -1
    # the subset search visits 2^m - 1 subsets of the m matched positions: a long unconstrained generation
    # (30 tokens without an end marker) would need 2^30; past this many positions the exact scan runs
    subset_positions = 12
    set_cache_items = 20_000_000  # posting-list sets kept for the subset search (~60 bytes per entry)
    eager_set_postings = 1_000_000  # up to this many postings (~200k items) the sets are built with the index

    def structural(self, terms: Sequence[str], top: int) -> tuple[np.ndarray, np.ndarray]:
        """(item indices, scores) of the ``top`` best structural matches, best first, ties by catalog order."""
        if self.match != "exact":
            return self._structural_scan(terms, top)
        wl = self._wlist
        hits = [(wl[j], k) for j, t in enumerate(terms[: len(wl)]) if (k := self.vocab.get(t)) is not None]
        total = sum(self._lens[k] for _, k in hits)
        if total <= self.small_postings:
            acc: dict[int, float] = {}
            for w, k in hits:
                for i in self._plist(k):
                    acc[i] = acc.get(i, 0.0) + w
            if not acc:
                return np.empty(0, np.int64), np.empty(0)
            if top == 1:  # grounding one beam: no sort needed
                i, v = max(acc.items(), key=lambda x: (x[1], -x[0]))
                return np.asarray([i], dtype=np.int64), np.asarray([v])
            best = sorted(acc.items(), key=lambda x: (-x[1], x[0]))[:top]
            return (np.asarray([i for i, _ in best], dtype=np.int64), np.asarray([v for _, v in best]))
        if total <= self.scan_postings or len(hits) > self.subset_positions:
            return self._structural_scan(terms, top)
        return self._structural_subsets(hits, top)

    def _plist(self, k: int) -> list[int]:
        """A posting list as a Python list (cached): the dict loop and the sets avoid numpy call overhead."""
        got = self._plists.get(k)
        if got is None:
            got = self._plists[k] = self.postings[self.indptr[k]:self.indptr[k + 1]].tolist()
        return got

    def _structural_subsets(self, hits: list[tuple[float, int]], top: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact matching: an item's score is the weight sum of the generated positions it matches, so
        visiting subsets of the matched positions by decreasing weight sum finds items in score order,
        and an item first appears at exactly its own matched set (every superset scores higher and was
        visited before). A subset's items are its shortest posting list's items found in all the others
        (set intersections, smallest first), in catalog order, stopping once ``top`` are found: a query
        touches a handful of rows, not whole posting lists of common terms. ``hits``: (weight, term id) of the matched positions (a
        repeated term counts at each of its positions, as the sum defines)."""
        if not hits or top <= 0:
            return np.empty(0, np.int64), np.empty(0)
        lens = self._lens
        by_len = sorted(range(len(hits)), key=lambda b: lens[hits[b][1]])  # a subset's lists, shortest first
        ks = [hits[b][1] for b in by_len]
        found: list[int] = []
        found_scores: list[float] = []
        seen: set[int] = set()
        for level, masks in _levels(tuple(w for w, _ in hits)):
            need = top - len(found)
            cands: set[int] = set()
            for mask in masks:
                cands.update(self._common([k for b, k in zip(by_len, ks) if mask >> b & 1], need, seen))
            if not cands:
                continue
            for c in sorted(cands)[:need]:
                seen.add(c)
                found.append(c)
                found_scores.append(level)
            if len(found) >= top:
                break
        return np.asarray(found, dtype=np.int64), np.asarray(found_scores)

    def _common(self, members: list[int], need: int, skip: set[int]) -> list[int]:
        """The first ``need`` items (catalog order) in the posting lists of every term id in ``members``
        (shortest first), not in ``skip``: C-level set intersections, smallest set first."""
        if len(members) == 1:
            out = []
            for x in self._plist(members[0]):
                if x not in skip:
                    out.append(x)
                    if len(out) >= need:
                        break
            return out
        common = self._pset(members[0]) & self._pset(members[1])
        for k in members[2:]:
            if not common:
                break
            common &= self._pset(k)
        if skip:
            common -= skip
        return sorted(common)[:need] if common else []

    def _pset(self, k: int) -> frozenset[int]:
        """A posting list as a set (cached; the cache is dropped past ``set_cache_items`` entries)."""
        got = self._psets.get(k)
        if got is None:
            if self._pset_items > self.set_cache_items:
                self._psets.clear()
                self._pset_items = 0
            got = self._psets[k] = frozenset(self._plist(k))
            self._pset_items += len(got)
        return got

    def _structural_scan(self, terms: Sequence[str], top: int) -> tuple[np.ndarray, np.ndarray]:
        """Substring matching (the reference's similarity): accumulate weights over posting lists."""
        idx_parts, w_parts = [], []
        for j, t in enumerate(terms[: len(self.weights)]):
            for k, sim in self._term_ids(t):
                p = self.postings[self.indptr[k]:self.indptr[k + 1]]
                idx_parts.append(p)
                w_parts.append(np.full(len(p), self.weights[j] * sim))
        if not idx_parts:
            return np.empty(0, np.int64), np.empty(0)
        idx = np.concatenate(idx_parts)
        w = np.concatenate(w_parts)
        items, inv = np.unique(idx, return_inverse=True)  # sorted: catalog order
        scores = np.bincount(inv, weights=w)
        top = min(top, len(items))
        # best score first; equal scores keep catalog order (stable sort on -score)
        order = np.argsort(-scores, kind="stable")[:top]
        return items[order], scores[order]

    def ground_one(self, generated: str | Sequence[str]) -> tuple[np.ndarray, str]:
        terms = parse_generated(generated) if isinstance(generated, str) else list(generated)
        hit = self.direct.get(tid_text(terms))
        if hit is not None:
            return hit, DIRECT
        items, _ = self.structural(terms, 1)
        return items, STRUCTURAL if len(items) else FILL

    # ---------------------------------------------------------------- beams -> ranked list
    def rank(self, beams: Sequence[str | Sequence[str]], k: int, extra_per_beam: int | None = None) -> Grounding:
        """Beams (best first) -> exactly ``k`` distinct items with how each was grounded."""
        parsed = [parse_generated(b) if isinstance(b, str) else list(b) for b in beams]
        out: list[int] = []
        how: list[str] = []
        scores: list[float] = []
        source: list[int | None] = []
        seen: set[int] = set()
        cands: list[tuple[np.ndarray, np.ndarray]] = []

        def push(i: int, h: str, s: float, beam: int | None) -> None:
            if i not in seen and len(out) < k:
                seen.add(int(i))
                out.append(int(i))
                how.append(h)
                scores.append(float(s))
                source.append(beam)

        deep = extra_per_beam if extra_per_beam is not None else k
        for b, terms in enumerate(parsed):
            hit = self.direct.get(tid_text(terms))
            if hit is not None:
                for i in hit:
                    push(i, DIRECT, float(self.weights[: len(terms)].sum()), b)
                cands.append((np.empty(0, np.int64), np.empty(0)))
                continue
            items, sc = self.structural(terms, deep + k)
            cands.append((items, sc))
            for i, s in zip(items, sc):  # the beam's best item not listed yet
                if int(i) not in seen:
                    push(i, STRUCTURAL, s, b)
                    break
            if len(out) >= k:
                break
        for b, (items, sc) in enumerate(cands):  # then further structural candidates, beams in order
            for i, s in zip(items, sc):
                if len(out) >= k:
                    break
                push(i, STRUCTURAL, s, b)
        for i in self.fallback:
            if len(out) >= k:
                break
            push(i, FILL, 0.0, None)
        return Grounding([str(self.item_ids[i]) for i in out], how, scores, source)

    def is_valid(self, generated: str | Sequence[str]) -> bool:
        terms = parse_generated(generated) if isinstance(generated, str) else list(generated)
        return tid_text(terms) in self.direct


def merge_beams(main: Sequence[tuple[str, float]], extra: Sequence[tuple[str, float]], bonus: float) -> list[str]:
    """Two beam lists as one, ``main``'s order kept: each of ``extra``'s TIDs (a search over other TIDs, e.g.
    the items added after training; best first) goes before the first main beam whose log-probability is
    below its own plus ``bonus``. TIDs already in ``main`` are not repeated. ``bonus=-inf``: ``main`` alone."""
    have = {t for t, _ in main}
    rest = sorted(((t, s + bonus) for t, s in extra if t not in have and s + bonus > -math.inf), key=lambda x: -x[1])
    out, j = [], 0
    for t, s in main:
        while j < len(rest) and rest[j][1] > s:
            out.append(rest[j][0])
            j += 1
        out.append(t)
    return out + [t for t, _ in rest[j:]]


def place_added(ranked: Sequence[str], candidates: Sequence[tuple[str, float]], min_score: float,
                slots: int, position: str = "top", depth: int | None = None) -> list[str]:
    """``ranked`` with items added after training placed in its first ``depth`` (the list shown; default all of
    it): of ``candidates`` (added items scored by their text similarity to an anchor, e.g. the user's last item;
    any order), up to ``slots`` whose score is at least ``min_score``, best first. ``position`` 'top': they go
    first, then ``ranked``'s order (an added item already in ``ranked`` moves up and is not repeated);
    'bottom': they take the last places of the shown list, pushing out its lowest items that are not
    candidates themselves (one already shown stays where the model put it) — the model's best guesses keep
    their places and the new items cost only its least likely ones. The model never trained on an added
    item's TID, so its own beams rarely reach one; this shows the new items that are near-twins of what the
    user is looking at."""
    picked = [i for i, s in sorted(candidates, key=lambda c: -c[1]) if s >= min_score][:max(0, slots)]
    if not picked:
        return list(ranked)
    have = set(picked)
    if position == "top":
        return picked + [i for i in ranked if i not in have]
    if position != "bottom":
        raise ValueError(f"position must be 'top' or 'bottom', got {position!r}")
    d = len(ranked) if depth is None else depth
    head = list(ranked[:d])
    extra = [i for i in picked if i not in head]
    drop: list[str] = []
    for i in reversed(head):
        if len(drop) == len(extra):
            break
        if i not in have:
            drop.append(i)
    gone = set(drop)
    return [i for i in head if i not in gone] + extra + drop[::-1] + [i for i in ranked[d:] if i not in have]


def placement_depth(depth: int, fill: int) -> int:
    """The places ``place_added``'s 'bottom' takes the last of when ``fill_content`` then gives the last ``fill``
    of ``depth`` to text neighbours: the ones above the fill (placing the added items in the fill's own places
    would have the fill take them back — a bottom placement no longer than the fill would change nothing)."""
    return max(1, depth - max(0, fill))


def fill_content(ranked: Sequence[str], content: Sequence[str], slots: int, depth: int = 10) -> list[str]:
    """``ranked`` with the last ``slots`` places of its shown list (its first ``depth``) given to ``content``
    (another ranking, best first, e.g. the text neighbours of the user's last item): the model's first
    ``depth - slots`` items keep their places, then ``content``'s first items not among them, then the rest of
    ``ranked`` (the items pushed out, below the shown list; none repeated), cut to ``ranked``'s length.
    ``slots=0``: ``ranked`` as it was."""
    if slots <= 0:
        return list(ranked)
    head = list(ranked[:max(0, depth - slots)])
    have = set(head)
    fill = [i for i in content if i not in have][:depth - len(head)]
    have.update(fill)
    return (head + fill + [i for i in ranked[len(head):] if i not in have])[:len(ranked)]


class TextNeighbours:
    """Items nearest an anchor item by text embedding (unit rows of ``embeddings``, one per ``item_ids``;
    cosine), among ``pool`` (e.g. the items added after training, for ``place_added``; the whole catalog, for
    ``fill_content``)."""

    def __init__(self, item_ids: Sequence[str], embeddings: np.ndarray, pool: Sequence[str]) -> None:
        self.at = {i: n for n, i in enumerate(item_ids)}
        self.emb = embeddings
        self.added = list(pool)
        self.cols = np.array([self.at[i] for i in self.added], dtype=np.int64)

    def candidates(self, anchors: Sequence[str | None], top: int) -> list[list[tuple[str, float]]]:
        """For each anchor, the ``top`` pool items nearest it with their cosine (the anchor itself, and an
        anchor without an embedding, give none)."""
        out: list[list[tuple[str, float]]] = [[] for _ in anchors]
        known = [(n, self.at[a]) for n, a in enumerate(anchors) if a is not None and a in self.at]
        if not known or not len(self.cols) or top <= 0:
            return out
        chunk = max(1, min(4096, (1 << 24) // len(self.cols)))  # a (chunk x pool) score block of <= 64 MB
        for s in range(0, len(known), chunk):
            part = known[s:s + chunk]
            rows = np.array([r for _, r in part])
            sc = self.emb[rows] @ self.emb[self.cols].T
            sc[self.cols[None, :] == rows[:, None]] = -np.inf
            if top < sc.shape[1]:  # each row's items scoring at least its top-th score, then a stable sort of
                # those: the same items, ties in pool order, as a full stable sort without sorting the pool
                kth = np.partition(sc, sc.shape[1] - top, axis=1)[:, sc.shape[1] - top]
                best = []
                for r, t in zip(sc, kth):
                    idx = np.flatnonzero(r >= t)
                    best.append(idx[np.argsort(-r[idx], kind="stable")[:top]])
            else:
                best = np.argsort(-sc, axis=1, kind="stable")[:, :top]
            for (n, _), r, b in zip(part, sc, best):
                out[n] = [(self.added[j], float(r[j])) for j in b if np.isfinite(r[j])]
        return out

    def ranked(self, anchors: Sequence[str | None], top: int) -> list[list[str]]:
        """``candidates``' item ids only, nearest first."""
        return [[i for i, _ in c] for c in self.candidates(anchors, top)]

    def floors(self, anchors: Sequence[str | None], within: int) -> list[float]:
        """For each anchor, the cosine of its ``within``-th nearest pool item: an item scoring at least that is
        among its ``within`` nearest (ties included); -inf where the pool has fewer, or the anchor no embedding."""
        return self.floors_at(anchors, [within])[within]

    def floors_at(self, anchors: Sequence[str | None], withins: Sequence[int]) -> dict[int, list[float]]:
        """``floors`` for several ``withins`` from one search (the deepest): within -> each anchor's floor."""
        cands = self.candidates(anchors, max(withins, default=0))
        return {w: [c[w - 1][1] if len(c) >= w else -np.inf for c in cands] for w in withins}

    def place(self, ranked: Sequence[Sequence[str]], anchors: Sequence[str | None], min_cosine: float,
              slots: int, position: str = "top", floors: Sequence[float] | None = None,
              depth: int | None = None) -> list[list[str]]:
        """Every ranked list with its added neighbours placed (``place_added``: first, or in the last of its first
        ``depth`` places), cut to its length; ``floors``: each list's own similarity floor besides ``min_cosine``
        (``gate``)."""
        cands = self.candidates(anchors, slots)
        if floors is not None:
            cands = gate(cands, floors)
        return [place_added(r, c, min_cosine, slots, position, depth)[:len(r)] for r, c in zip(ranked, cands)]


def gate(cands: Sequence[Sequence[tuple[str, float]]], floors: Sequence[float]) -> list[list[tuple[str, float]]]:
    """Each user's scored candidates kept only where the score reaches that user's floor: with
    ``TextNeighbours(every item).floors(anchors, D)``, an added item is placed only when it is among the D items
    of the whole catalog nearest the anchor (``eval.added_within``) — what the content baseline would show."""
    return [[(i, s) for i, s in c if s >= f] for c, f in zip(cands, floors)]
