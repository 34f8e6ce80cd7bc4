"""Pure building blocks of stage 1: rejects, k-core, ordering, sequences, leave-one-out targets.

Interactions travel as a pandas frame with columns ``user_id`` (str), ``item_id`` (str),
``timestamp`` (Int64, nullable) and ``order`` (int64: the row's position in its source file, which is
the tie-break for equal timestamps under ``tie_break='file_order'``).
"""

from __future__ import annotations

import html
import json
import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from grlm_ray.core.errors import DataError
from grlm_ray.core.schemas import RAW_TEXT, REJECTS, SEQUENCES, TARGETS


@dataclass
class Rejects:
    """Collects rows that were dropped or repaired, so nothing is lost silently.

    policy 'report': rows are recorded (written as ``rejects.parquet``) and counted;
    policy 'error': the first dropped row raises a DataError naming file, line and field.
    """

    policy: str = "report"
    rows: list[dict] = field(default_factory=list)

    def add(self, source: str, line: int | None, field_name: str, reason: str,
            action: str = "dropped", value: object = "") -> None:
        if action == "dropped" and self.policy == "error":
            raise DataError(reason, where=source, line=line, field=field_name)
        self.rows.append({"source": source, "line": line, "field": field_name, "reason": reason,
                          "action": action, "value": _short(value)})

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            key = f"{r['action']}: {r['reason'].split(':')[0]}"
            out[key] = out.get(key, 0) + 1
        return out

    def table(self) -> pa.Table:
        if not self.rows:
            return REJECTS.arrow.empty_table()
        return pa.Table.from_pylist(self.rows, schema=REJECTS.arrow)


def _short(value: object, limit: int = 200) -> str:
    s = value if isinstance(value, str) else repr(value)
    return s if len(s) <= limit else s[:limit] + "..."


# ------------------------------------------------------------------ item text
TEXT_FIELDS = ("title", "description", "brand", "category")
_ENTITY = re.compile(r"&(#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
# C0 / C1 controls other than whitespace, zero-width and bidi marks, the BOM: never part of a product's text
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")


def clean_text(value: str) -> tuple[str, list[str]]:
    """``value`` with HTML entities unescaped (up to three rounds: ``&amp;reg;`` is ``®``), control and
    zero-width characters removed, whitespace runs collapsed to one space and trimmed, Unicode NFC.
    Returns the text and what was repaired (``html entities``, ``control characters``, ``whitespace``,
    ``unicode normalization``); an empty list when the value was clean."""
    kinds: list[str] = []
    s = value
    for _ in range(3):
        if "&" not in s or not _ENTITY.search(s):
            break
        u = html.unescape(s)
        if u == s:
            break
        s = u
        if "html entities" not in kinds:
            kinds.append("html entities")
    c = _CONTROL.sub(" ", s)
    if c != s:
        kinds.append("control characters")
    w = " ".join(c.split())
    if w != c:
        kinds.append("whitespace")
    n = unicodedata.normalize("NFC", w)
    if n != w:
        kinds.append("unicode normalization")
    return n, kinds


def clean_items(items: pa.Table, source: str, rejects: Rejects) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Clean every text field of an items table (``clean_text``; category lists element-wise, empty and
    repeated elements dropped). Each repaired value becomes a ``repaired`` rejects row (row, field, what) and a
    ``raw_text`` row holding its source text; returns (items, raw_text, repaired values per field)."""
    ids = items.column("item_id").to_pylist()
    raw_rows: list[dict[str, str]] = []
    counts: dict[str, int] = {}
    out = items
    for name in TEXT_FIELDS + ("categories",):
        if name not in items.column_names:
            continue
        col = items.column(name).to_pylist()
        new, changed = [], 0
        for row, v in enumerate(col):
            if name == "categories":
                parts = [clean_text(x or "") for x in (v or [])]
                kinds = sorted({k for _, ks in parts for k in ks})
                cleaned = list(dict.fromkeys(t for t, _ in parts if t))
                if len(cleaned) != len(v or []):
                    kinds.append("empty or repeated entries")
                raw = json.dumps(v or [], ensure_ascii=False)
            else:
                cleaned, kinds = clean_text(v or "")
                raw = v or ""
            new.append(cleaned)
            if kinds:
                changed += 1
                raw_rows.append({"item_id": ids[row], "field": name, "raw": raw})
                rejects.add(source, row, name, f"text cleaned ({', '.join(kinds)}): item {ids[row]}",
                            action="repaired", value=raw)
        if changed:
            counts[name] = changed
            idx = out.column_names.index(name)
            out = out.set_column(idx, out.schema.field(name), pa.array(new, out.schema.field(name).type))
    raw_table = (pa.Table.from_pylist(raw_rows, schema=RAW_TEXT.arrow) if raw_rows
                 else RAW_TEXT.arrow.empty_table())
    return out, raw_table, counts


def order_interactions(df: pd.DataFrame, tie_break: str) -> pd.DataFrame:
    """Chronological order per user. Equal (or missing) timestamps keep file order or go by item id."""
    keys = ["user_id", "timestamp", "order"] if tie_break == "file_order" else ["user_id", "timestamp", "item_id", "order"]
    return df.sort_values(keys, kind="stable", na_position="first").reset_index(drop=True)


def drop_duplicate_interactions(df: pd.DataFrame, policy: str) -> tuple[pd.DataFrame, int]:
    """Repeated (user, item) pairs: keep the chronologically first one, or keep all."""
    if policy == "keep_all":
        return df, 0
    dup = df.duplicated(["user_id", "item_id"], keep="first")
    return df.loc[~dup].reset_index(drop=True), int(dup.sum())


def k_core(df: pd.DataFrame, k: int) -> tuple[pd.DataFrame, int]:
    """Drop users and items with fewer than k interactions, repeated until nothing changes.

    Returns the filtered frame and the number of rounds it took to reach the fixed point.
    """
    if k <= 1:
        return df, 0
    rounds = 0
    while True:
        rounds += 1
        u = df["user_id"].map(df["user_id"].value_counts())
        i = df["item_id"].map(df["item_id"].value_counts())
        keep = (u >= k) & (i >= k)
        if keep.all():
            return df.reset_index(drop=True), rounds
        df = df.loc[keep]


def drop_short_users(df: pd.DataFrame, min_len: int) -> tuple[pd.DataFrame, int]:
    counts = df["user_id"].map(df["user_id"].value_counts())
    short = counts < min_len
    n_users = int(df.loc[short, "user_id"].nunique())
    return df.loc[~short].reset_index(drop=True), n_users


def build_sequences(df: pd.DataFrame, max_len: int | None = None) -> pa.Table:
    """Ordered interactions -> one row per user (sorted by user id), chronological item lists."""
    if df.empty:
        return SEQUENCES.arrow.empty_table()
    df = df.sort_values("user_id", kind="stable")  # stable: keeps each user's chronological order
    users, starts = np.unique(df["user_id"].to_numpy(dtype=object), return_index=True)
    bounds = list(starts[1:]) + [len(df)]
    items = df["item_id"].to_numpy(dtype=object)
    ts = df["timestamp"]
    has_ts = ts.notna().any()
    ts_np = ts.to_numpy(dtype="float64", na_value=np.nan) if has_ts else None
    item_lists, ts_lists = [], []
    for s, e in zip(starts, bounds):
        if max_len is not None and e - s > max_len:
            s = e - max_len
        item_lists.append(list(items[s:e]))
        if has_ts:
            seg = ts_np[s:e]
            ts_lists.append(None if np.isnan(seg).any() else [int(x) for x in seg])
        else:
            ts_lists.append(None)
    return pa.table({
        "user_id": pa.array([str(u) for u in users], pa.string()),
        "item_ids": pa.array(item_lists, pa.list_(pa.string())),
        "timestamps": pa.array(ts_lists, pa.list_(pa.int64())),
    })


def _targets(sequences: pa.Table, positions) -> pa.Table:
    """``positions(items)`` yields (domain, valid position, test position) per target domain."""
    rows: dict[str, list] = {"user_id": [], "split": [], "domain": [], "position": [], "target_item_id": []}
    for u, items in zip(sequences.column("user_id").to_pylist(), sequences.column("item_ids").to_pylist()):
        for domain, valid_pos, test_pos in positions(items):
            for split, pos in (("valid", valid_pos), ("test", test_pos)):
                rows["user_id"].append(u)
                rows["split"].append(split)
                rows["domain"].append(domain)
                rows["position"].append(pos)
                rows["target_item_id"].append(items[pos])
    return pa.table(rows, schema=TARGETS.arrow)


def leave_one_out_targets(sequences: pa.Table, domain: str) -> pa.Table:
    """Last item = test target, second last = validation target; history = the items before it."""
    return _targets(sequences, lambda items: [(domain, len(items) - 2, len(items) - 1)])


def per_domain_targets(sequences: pa.Table, domains: list[str]) -> pa.Table:
    """Cross-domain: in each user's merged sequence, the last item of each domain is that domain's test
    target and the second last of that domain its validation target (item ids are ``domain/...``)."""

    def positions(items: list[str]):
        for d in domains:
            idx = [i for i, it in enumerate(items) if it.split("/", 1)[0] == d]
            yield d, idx[-2], idx[-1]

    return _targets(sequences, positions)


# ------------------------------------------------------------------ cold start: items training never sees
@dataclass
class Holdout:
    """What ``hold_out`` gives: the seen catalog, the held-out items, the sequences and targets without them
    (test targets kept), and what it did (counts, the arrival rule)."""

    items: pa.Table
    held: pa.Table
    sequences: pa.Table
    targets: pa.Table
    info: dict
    # the validation split's real new-item targets: a user whose validation target (the item just before the
    # test target) was a held-out item, which the holdout took out of the history; ``position`` is that of the
    # test target in ``sequences`` (the history is the seen items bought before it, as a test history is)
    arrival_targets: pa.Table


def arrival_scores(sequences: pa.Table) -> tuple[dict[str, float], str]:
    """How late each item arrived, higher = later: its first timestamp when every user has timestamps,
    otherwise its mean relative position in the users' sequences (0 = a user's first item, 1 = the last):
    an item that appears only late in people's histories is the closest thing to an arrival there is."""
    ts = sequences.column("timestamps").to_pylist()
    seqs = sequences.column("item_ids").to_pylist()
    if ts and all(t is not None for t in ts):
        first: dict[str, float] = {}
        for items, stamps in zip(seqs, ts):
            for i, t in zip(items, stamps):
                first[i] = min(first.get(i, float(t)), float(t))
        return first, "first timestamp"
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    for items in seqs:
        last = max(1, len(items) - 1)
        for j, i in enumerate(items):
            total[i] = total.get(i, 0.0) + j / last
            count[i] = count.get(i, 0) + 1
    return {i: total[i] / count[i] for i in total}, "mean relative position in users' sequences (no timestamps)"


def hold_out(items: pa.Table, sequences: pa.Table, targets: pa.Table, share: float, candidates: float, seed: int,
             min_len: int = 3) -> Holdout:
    """The cold-start split. ``round(share * items)`` items, drawn (seeded) among the ``candidates`` share of
    the catalog that arrived last (``arrival_scores``; ties by item id), leave the catalog; every user's
    history loses them, except the test target (the last item), which stays what it was — a seen item or a
    new one. Validation targets are then the last seen item before it. Users left with fewer than
    ``min_len`` items are dropped (counted). Refused, with the numbers, when the catalog cannot give the
    share asked for."""
    ids = items.column("item_id").to_pylist()
    n = len(ids)
    want = int(round(share * n))
    scores, rule = arrival_scores(sequences)
    pool_n = int(round(candidates * n))
    if want < 1:
        raise DataError(f"data.holdout.share={share} of {n} items holds out no item (at least 1 / {n} is needed)")
    if want > pool_n:
        raise DataError(f"data.holdout: {want} items asked for (share {share} of {n}) but only {pool_n} candidates "
                        f"(data.holdout.candidates={candidates}); raise candidates or lower share")
    # items no sequence holds (possible in bring-your-own catalogs) arrived last of all: never bought
    order = sorted(ids, key=lambda i: (-scores.get(i, float("inf")), i))
    pool = order[:pool_n]
    rng = np.random.default_rng(seed)
    held = set(np.asarray(pool, dtype=object)[np.sort(rng.choice(pool_n, size=want, replace=False))].tolist())
    mask = pa.array([i in held for i in ids])
    import pyarrow.compute as pc

    domain_of = {}
    for r in targets.select(["user_id", "domain"]).to_pylist():
        domain_of.setdefault(r["user_id"], r["domain"])
    users, seqs_out, ts_out, dropped, removed = [], [], [], 0, 0
    arrivals: dict[str, list] = {"user_id": [], "split": [], "domain": [], "position": [], "target_item_id": []}
    for u, its, ts in zip(sequences.column("user_id").to_pylist(), sequences.column("item_ids").to_pylist(),
                          sequences.column("timestamps").to_pylist()):
        keep = [j for j, i in enumerate(its[:-1]) if i not in held] + [len(its) - 1]
        removed += len(its) - len(keep)
        if len(keep) < min_len:
            dropped += 1
            continue
        users.append(u)
        seqs_out.append([its[j] for j in keep])
        ts_out.append(None if ts is None else [ts[j] for j in keep])
        if len(its) >= 2 and its[-2] in held:  # its validation target was an arrival: kept apart, with its history
            for k, v in (("user_id", u), ("split", "valid"), ("domain", domain_of.get(u)),
                         ("position", len(keep) - 1), ("target_item_id", its[-2])):
                arrivals[k].append(v)
    seqs = pa.table({"user_id": pa.array(users, pa.string()),
                     "item_ids": pa.array(seqs_out, pa.list_(pa.string())),
                     "timestamps": pa.array(ts_out, pa.list_(pa.int64()))})
    rows: dict[str, list] = {"user_id": [], "split": [], "domain": [], "position": [], "target_item_id": []}
    for u, its in zip(users, seqs_out):
        for split, pos in (("valid", len(its) - 2), ("test", len(its) - 1)):
            rows["user_id"].append(u)
            rows["split"].append(split)
            rows["domain"].append(domain_of.get(u))
            rows["position"].append(pos)
            rows["target_item_id"].append(its[pos])
    new_targets = sum(1 for its in seqs_out if its[-1] in held)
    held_t = items.filter(mask)
    no_text = [i for i, t, d in zip(held_t.column("item_id").to_pylist(), held_t.column("title").to_pylist(),
                                    held_t.column("description").to_pylist()) if not (t or "").strip() and not (d or "").strip()]
    info = {"share": share, "candidates": candidates, "seed": seed, "arrival": rule, "items": n,
            "candidate_items": pool_n, "held_out_items": want, "held_out_items_without_text": len(no_text),
            "interactions_removed": removed, "users_dropped_below_min": dropped, "users": len(users),
            "test_targets_new": new_targets, "test_targets_seen": len(users) - new_targets,
            "valid_targets_new": len(arrivals["user_id"])}
    return Holdout(items.filter(pc.invert(mask)), held_t, seqs, pa.table(rows, schema=TARGETS.arrow), info,
                   pa.table(arrivals, schema=TARGETS.arrow))
