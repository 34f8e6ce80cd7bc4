"""Dataset statistics for a prepared stage folder or a bundle (local or s3://)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from grlm_ray.core.config import S3Config
from grlm_ray.core.errors import DataError
from grlm_ray.core.storage import Store


def dataset_stats(path: str, s3: S3Config | None = None) -> dict[str, Any]:
    """users, items, interactions, sequence-length percentiles (+ per-domain targets when present)."""
    store = Store(path, s3)
    for name in ("items.parquet", "sequences.parquet"):
        if not store.exists(name):
            raise DataError(f"no {name} here: expected a prepared stage folder or a bundle", where=store.uri(""))
    items = store.read_table("items.parquet")
    seqs = store.read_table("sequences.parquet")
    for col, t, f in (("item_id", items, "items.parquet"), ("user_id", seqs, "sequences.parquet"),
                      ("item_ids", seqs, "sequences.parquet")):
        if col not in t.column_names:
            raise DataError("missing column", where=store.uri(f), field=col)
    lengths = pc.list_value_length(seqs.column("item_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(seqs.column("item_ids"))
    out: dict[str, Any] = {
        "path": store.uri(""),
        "users": int(seqs.num_rows),
        "items": int(items.num_rows),
        "interactions": int(lengths.sum()),
        "items_interacted": int(pc.count_distinct(flat).as_py()),
        "density": float(lengths.sum() / max(1, seqs.num_rows * items.num_rows)),
        "sequence_length": {
            "min": int(lengths.min()) if len(lengths) else 0,
            "mean": round(float(lengths.mean()), 3) if len(lengths) else 0.0,
            **{f"p{q}": float(np.percentile(lengths, q)) if len(lengths) else 0.0 for q in (25, 50, 75, 90, 99)},
            "max": int(lengths.max()) if len(lengths) else 0,
        },
    }
    if "title" in items.column_names:
        titles = pc.fill_null(pc.cast(items.column("title"), pa.string()), "")
        out["items_with_title"] = int(pc.sum(pc.greater(pc.utf8_length(titles), 0)).as_py() or 0)
    if "category" in items.column_names:
        cats = items.column("category").value_counts().to_pylist()
        out["items_per_category"] = {c["values"]: int(c["counts"]) for c in cats}
    if store.exists("targets.parquet"):
        t = store.read_table("targets.parquet")
        test = t.filter(pc.equal(t.column("split"), "test"))
        out["test_targets_per_domain"] = {r["values"]: int(r["counts"]) for r in test.column("domain").value_counts().to_pylist()}
    return out


def format_stats(s: dict[str, Any], compact: bool = False) -> str:
    """The full table (`grlm data stats`), or two lines for a run's summary."""
    sl = s["sequence_length"]
    if compact:
        return (f"dataset   {s['users']:,} users, {s['items']:,} items, {s['interactions']:,} interactions "
                f"(density {s['density']:.6f}); {s['path']}\n"
                "          sequence length p50 {p50:g}, p90 {p90:g}, max {max}, mean {mean}".format(**sl))
    lines = [
        f"dataset      {s['path']}",
        f"users        {s['users']:,}",
        f"items        {s['items']:,}  (interacted: {s['items_interacted']:,})",
        f"interactions {s['interactions']:,}",
        f"density      {s['density']:.6f}",
        "seq length   min {min}  p25 {p25:g}  p50 {p50:g}  p75 {p75:g}  p90 {p90:g}  p99 {p99:g}  max {max}  mean {mean}".format(**sl),
    ]
    if "items_with_title" in s:
        lines.append(f"titles       {s['items_with_title']:,} items with a non-empty title")
    if "items_per_category" in s:
        lines.append("categories   " + ", ".join(f"{k}: {v:,}" for k, v in s["items_per_category"].items()))
    if "test_targets_per_domain" in s:
        lines.append("test targets " + ", ".join(f"{k}: {v:,}" for k, v in s["test_targets_per_domain"].items()))
    return "\n".join(lines)
