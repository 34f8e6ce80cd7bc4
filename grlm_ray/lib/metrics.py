"""Ranking metrics on grounded item lists (never on identifiers): Recall@K, NDCG@K, VR@K, DHR@K.

One held-out target per user and domain (leave-one-out), so Recall@K = HitRate@K and
NDCG@K = 1 / log2(rank + 2) for a hit at 0-based ``rank`` < K, else 0.
VR@K  = share of the first K generated TIDs that exist in the catalog (valid rate);
DHR@K = share of the first K ranked items grounded by the direct map (direct-hit rate).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any, Iterable, Sequence


def recall_at_k(ranked: Sequence[str], target: str, k: int) -> float:
    return 1.0 if target in ranked[:k] else 0.0


def ndcg_at_k(ranked: Sequence[str], target: str, k: int) -> float:
    top = list(ranked[:k])
    return 1.0 / math.log2(top.index(target) + 2) if target in top else 0.0


def vr_at_k(valid_flags: Sequence[bool], k: int) -> float:
    flags = list(valid_flags[:k])
    return sum(flags) / len(flags) if flags else 0.0


def dhr_at_k(grounded_by: Sequence[str], k: int) -> float:
    g = list(grounded_by[:k])
    return sum(1 for x in g if x == "direct") / len(g) if g else 0.0


def score_rankings(rows: Iterable[dict], ks: Sequence[int] = (5, 10, 20)) -> dict:
    """rows: dicts with target_item_id, ranked_item_ids, grounded_by, domain and (optional) beam_valid.
    Returns {'overall': {...}, 'per_domain': {domain: {...}}, 'users': n} with keys like recall_at_10."""
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        for scope in ("overall", r.get("domain") or ""):
            c = sums[scope]
            counts[scope] += 1
            for k in ks:
                c[f"recall_at_{k}"] += recall_at_k(r["ranked_item_ids"], r["target_item_id"], k)
                c[f"ndcg_at_{k}"] += ndcg_at_k(r["ranked_item_ids"], r["target_item_id"], k)
                c[f"dhr_at_{k}"] += dhr_at_k(r["grounded_by"], k)
                if "beam_valid" in r:
                    c[f"vr_at_{k}"] += vr_at_k(r["beam_valid"], k)
    def avg(scope: str) -> dict[str, float]:
        n = counts[scope]
        return {m: round(v / n, 6) for m, v in sorted(sums[scope].items())} | {"users": n}
    out = {"overall": avg("overall") if counts["overall"] else {"users": 0}}
    out["per_domain"] = {d: avg(d) for d in sorted(counts) if d not in ("overall", "")}
    return out


def format_metrics(info: dict[str, Any], ks: tuple[int, ...] = (5, 10)) -> list[str]:
    m, p = info["metrics"], info["popularity"]
    head = f"          {'':11s}" + "".join(f"{f'R@{k}':>8s}{f'N@{k}':>8s}" for k in ks) + f"{'VR@10':>8s}{'DHR@10':>8s}"
    lines = [head]
    for name, d in (("GRLM", m), ("popularity", p)):
        cells = "".join(f"{d.get(f'recall_at_{k}', 0):8.4f}{d.get(f'ndcg_at_{k}', 0):8.4f}" for k in ks)
        vr = f"{d['vr_at_10']:8.3f}" if "vr_at_10" in d else f"{'-':>8s}"
        dh = f"{d['dhr_at_10']:8.3f}" if name == "GRLM" else f"{'-':>8s}"
        lines.append(f"          {name:11s}{cells}{vr}{dh}")
    per_domain = info.get("per_domain") or {}
    if len(per_domain) > 1:  # a joint catalog: GRLM per domain, and its top 10's share from other domains
        lines.append(f"          {'per domain':11s}" + "".join(f"{f'R@{k}':>8s}{f'N@{k}':>8s}" for k in ks)
                     + f"{'other@10':>9s}{'users':>8s}")
        for dom, d in sorted(per_domain.items()):
            cells = "".join(f"{d.get(f'recall_at_{k}', 0):8.4f}{d.get(f'ndcg_at_{k}', 0):8.4f}" for k in ks)
            other = f"{d['cross_domain_at_10']:9.3f}" if "cross_domain_at_10" in d else f"{'-':>9s}"
            lines.append(f"          {dom[:11]:11s}{cells}{other}{d.get('users', 0):8d}")
    lines.append(f"          users {m['users']}, protocol: {json.dumps(info['protocol'], sort_keys=True)[:160]}")
    return lines


class RankingSums:
    """``score_rankings`` over Arrow columns, a slice of users at a time: no Python object per user or per
    ranked item (at 1.87M users the row dicts were several GB). ``add`` the slices, then ``result()`` gives
    what ``score_rankings`` gives for the same rows (``with_valid``: the rows carry beam_valid flags)."""

    def __init__(self, ks: Sequence[int], with_valid: bool, namespaced: bool = False) -> None:
        """``namespaced``: item ids are ``<domain>/<id>`` (joint, cross-domain catalogs): each user's share of
        ranked items from another domain than the user's (``cross_domain_at_k``) is counted too."""
        self.ks, self.with_valid, self.namespaced = tuple(ks), with_valid, namespaced
        self.sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.counts: dict[str, int] = defaultdict(int)

    @staticmethod
    def _firsts(lists: Any, hit: Any) -> Any:
        """``k -> (hits among each row's first k entries, the row's entries among its first k)`` for a list
        column and a boolean per flattened entry."""
        import numpy as np
        import pyarrow.compute as pc

        offs = lists.offsets.to_numpy().astype(np.int64)
        offs -= offs[0] if len(offs) else 0
        n, sizes = len(offs) - 1, np.diff(offs)
        parent = pc.list_parent_indices(lists).to_numpy().astype(np.int64)
        pos = np.arange(len(parent)) - offs[parent]
        return lambda k: (np.bincount(parent[(pos < k) & hit], minlength=n)[:n], np.minimum(sizes, k))

    def add(self, domain: Any, target: Any, ranked: Any, grounded: Any, valid: Any = None) -> None:
        """Arrow columns of one slice of users: domain, target item, ranked item ids (list), grounded_by
        (list) and, with ``with_valid``, beam_valid (list of bool)."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        def arr(a: Any) -> Any:
            return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a

        domain, target, ranked, grounded = arr(domain), arr(target), arr(ranked), arr(grounded)
        n = len(target)
        if not n:
            return
        flat = pc.list_flatten(ranked)
        parent = pc.list_parent_indices(ranked).to_numpy().astype(np.int64)
        offs = ranked.offsets.to_numpy().astype(np.int64)
        offs -= offs[0]
        eq = pc.fill_null(pc.equal(flat, target.take(pa.array(parent))), False).to_numpy(zero_copy_only=False)
        rank = np.full(n, np.iinfo(np.int64).max)
        np.minimum.at(rank, parent[eq], (np.arange(len(parent)) - offs[parent])[eq])  # first hit
        shares = {"dhr": self._firsts(grounded, pc.fill_null(pc.equal(pc.list_flatten(grounded), "direct"), False)
                                      .to_numpy(zero_copy_only=False))}
        if self.namespaced:
            home = pc.list_element(pc.split_pattern(flat, "/", max_splits=1), 0)
            other = pc.invert(pc.fill_null(pc.equal(home, pc.fill_null(domain, "").take(pa.array(parent))), False))
            shares["cross_domain"] = self._firsts(ranked, other.to_numpy(zero_copy_only=False).astype(bool))
        if self.with_valid:
            valid = arr(valid)
            shares["vr"] = self._firsts(valid, pc.fill_null(pc.list_flatten(valid), False)
                                        .to_numpy(zero_copy_only=False).astype(bool))
        values: dict[str, Any] = {}
        for k in self.ks:
            hit = rank < k
            values[f"recall_at_{k}"] = hit.astype(np.float64)
            values[f"ndcg_at_{k}"] = np.where(hit, 1.0 / np.log2(np.minimum(rank, k) + 2.0), 0.0)
            for name, firsts in shares.items():
                got, size = firsts(k)
                values[f"{name}_at_{k}"] = np.divide(got, size, out=np.zeros(n), where=size > 0)
        codes = pc.dictionary_encode(pc.fill_null(domain, ""))
        idx = codes.indices.to_numpy()
        names = codes.dictionary.to_pylist()
        self.counts["overall"] += n
        for m, v in values.items():
            self.sums["overall"][m] += float(v.sum())
        for j, d in enumerate(names):
            if not d:
                continue
            mask = idx == j
            self.counts[d] += int(mask.sum())
            for m, v in values.items():
                self.sums[d][m] += float(v[mask].sum())

    def result(self) -> dict:
        def avg(scope: str) -> dict[str, float]:
            c = self.counts[scope]
            return {m: round(v / c, 6) for m, v in sorted(self.sums[scope].items())} | {"users": c}

        out = {"overall": avg("overall") if self.counts["overall"] else {"users": 0}}
        out["per_domain"] = {d: avg(d) for d in sorted(self.counts) if d not in ("overall", "")}
        return out
