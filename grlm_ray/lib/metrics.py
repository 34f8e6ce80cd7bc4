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
    lines.append(f"          users {m['users']}, protocol: {json.dumps(info['protocol'], sort_keys=True)[:160]}")
    return lines
