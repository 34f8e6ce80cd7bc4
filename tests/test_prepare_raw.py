"""Raw Amazon 2014 files written by the test: 5-core to a fixed point, ordering, split, bad lines."""

import gzip
import json

import pyarrow.compute as pc
import pytest

from grlm_ray.core.config import load_config
from grlm_ray.core.errors import DataError
from grlm_ray.stages.prepare import prepare
from grlm_ray.core.storage import Store

CORE_USERS = ["u1", "u2", "u3", "u4", "u5"]
CORE_ITEMS = ["A", "B", "C", "D", "E"]


def review(user, asin, ts, text="ok"):
    return json.dumps({"reviewerID": user, "asin": asin, "unixReviewTime": ts, "reviewText": text}).encode()


def write_raw(d, category="Beauty", extra_lines=()):
    """u1..u5 x A..E is a 5-core. u7..u10 (F,A,B,C) have 4 -> dropped in round 1; then F has 1 (u6) ->
    dropped in round 2; then u6 has 4 -> dropped in round 3. A single pass would keep u6 and F."""
    lines = []
    # u1: equal timestamps for E and D (E first in the file); file order gives A E D C B
    lines += [review("u1", "A", 10), review("u1", "E", 20), review("u1", "D", 20), review("u1", "C", 30),
              review("u1", "B", 40)]
    for k, u in enumerate(CORE_USERS[1:], start=2):
        for j, it in enumerate(CORE_ITEMS):
            text = "caf\xe9".encode("latin-1") if (u == "u2" and it == "C") else b"fine"
            raw = review(u, it, 100 * k + j)
            if u == "u2" and it == "C":  # a non-UTF-8 byte in the review text: repaired, kept
                raw = raw.replace(b'"ok"', b'"' + text + b'"')
            lines.append(raw)
    lines += [review("u6", it, 500 + j) for j, it in enumerate(["A", "B", "C", "D", "F"])]
    for u in ["u7", "u8", "u9", "u10"]:
        lines += [review(u, it, 600 + j) for j, it in enumerate(["F", "A", "B", "C"])]
    lines += [b"{not json at all", b'{"reviewerID": "u1", "asin": "A"}']  # malformed, missing time
    lines += list(extra_lines)
    with gzip.open(d / f"reviews_{category}_5.json.gz", "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    meta = [
        "{'asin': 'A', 'title': 'Shampoo &amp; Care', 'brand': 'Lu', 'categories': [['Beauty', 'Hair'], ['Beauty']], "
        "'description': 'Gentle wash'}",
        "{'asin': 'B', 'title': 'Conditioner', 'categories': [['Beauty', 'Hair']]}",
        "{'asin': 'C', 'title': \"Kid's Lotion\", 'categories': [['Beauty']]}",
        "{'asin': 'D', 'title': 'Serum', 'price': 9.5}",
        "{'asin': 'ZZ', 'title': 'not reviewed'}",
        "{'asin': 'B', 'title': 'duplicate meta line'}",
        "{'title': 'no asin here'",
    ]  # E has no meta line
    with gzip.open(d / f"meta_{category}.json.gz", "wb") as f:
        f.write("\n".join(meta).encode() + b"\n")


def raw_config(tmp_path, **over):
    ov = [f"run.root={tmp_path / 'runs'}", "run.name=t", f"data.base_dir={tmp_path}",
          "data.domains={beauty: {kind: amazon_raw, category: Beauty}}"]
    ov += [f"{k}={v}" for k, v in over.items()]
    return load_config(None, ov)


def read(tmp_path, name):
    return Store(str(tmp_path / "runs")).read_table(f"t/prepare/{name}")


def test_five_core_reaches_a_fixed_point(tmp_path):
    write_raw(tmp_path)
    m = prepare(raw_config(tmp_path))
    seqs = read(tmp_path, "sequences.parquet")
    assert sorted(seqs.column("user_id").to_pylist()) == sorted(CORE_USERS)
    assert sorted(read(tmp_path, "items.parquet").column("item_id").to_pylist()) == CORE_ITEMS
    kc = m["info"]["domains"]["beauty"]["k_core"]
    assert kc["rounds"] == 4 and kc["users_dropped"] == 5 and kc["items_dropped"] == 1


def test_order_ties_split_and_timestamps(tmp_path):
    write_raw(tmp_path)
    prepare(raw_config(tmp_path))
    seqs = {r["user_id"]: r for r in read(tmp_path, "sequences.parquet").to_pylist()}
    assert seqs["u1"]["item_ids"] == ["A", "E", "D", "C", "B"]  # tie 20/20: file order
    assert seqs["u1"]["timestamps"] == [10, 20, 20, 30, 40]
    targets = read(tmp_path, "targets.parquet").to_pylist()
    t1 = {r["split"]: r for r in targets if r["user_id"] == "u1"}
    assert (t1["test"]["target_item_id"], t1["test"]["position"]) == ("B", 4)
    assert (t1["valid"]["target_item_id"], t1["valid"]["position"]) == ("C", 3)
    assert len(targets) == 2 * len(seqs)


def test_tie_break_by_item_id(tmp_path):
    write_raw(tmp_path)
    prepare(raw_config(tmp_path, **{"data.tie_break": "item_id"}))
    seqs = {r["user_id"]: r for r in read(tmp_path, "sequences.parquet").to_pylist()}
    assert seqs["u1"]["item_ids"] == ["A", "D", "E", "C", "B"]


def test_meta_literals_html_and_missing_meta(tmp_path):
    write_raw(tmp_path)
    m = prepare(raw_config(tmp_path))
    items = {r["item_id"]: r for r in read(tmp_path, "items.parquet").to_pylist()}
    assert items["A"]["title"] == "Shampoo & Care" and items["A"]["brand"] == "Lu"
    assert items["A"]["categories"] == ["Beauty", "Hair"]
    assert items["C"]["title"] == "Kid's Lotion"
    assert items["B"]["title"] == "Conditioner"  # the duplicate meta line is reported, not used
    assert items["E"]["title"] == "" and m["info"]["domains"]["beauty"]["items_without_meta"] == 1


def test_bad_lines_are_reported_not_lost(tmp_path):
    write_raw(tmp_path)
    m = prepare(raw_config(tmp_path))
    rej = read(tmp_path, "rejects.parquet").to_pylist()
    reasons = {(r["action"], r["reason"].split(":")[0], r["line"]) for r in rej}
    n_reviews = 5 + 20 + 5 + 16
    assert ("dropped", "malformed JSON line", n_reviews + 1) in reasons
    assert ("dropped", "missing field", n_reviews + 2) in reasons
    assert any(a == "repaired" and r.startswith("non-UTF-8") for a, r, _ in reasons)
    assert any(r.startswith("duplicate asin") for _, r, _ in reasons)
    assert any(r.startswith("malformed meta line") for _, r, _ in reasons)
    # the repaired review still counts: u2 keeps all five items
    seqs = {r["user_id"]: r for r in read(tmp_path, "sequences.parquet").to_pylist()}
    assert len(seqs["u2"]["item_ids"]) == 5
    assert m["info"]["rejects"]["dropped: malformed JSON line"] == 1


def test_invalid_rows_error_policy_names_file_and_line(tmp_path):
    write_raw(tmp_path)
    with pytest.raises(DataError, match=r"reviews_Beauty_5\.json\.gz, line 47.*malformed JSON"):
        prepare(raw_config(tmp_path, **{"data.invalid_rows": "error"}))


def test_duplicate_interactions_keep_first(tmp_path):
    write_raw(tmp_path, extra_lines=[review("u3", "A", 999)])
    m = prepare(raw_config(tmp_path))
    seqs = {r["user_id"]: r for r in read(tmp_path, "sequences.parquet").to_pylist()}
    assert seqs["u3"]["item_ids"].count("A") == 1
    assert m["info"]["domains"]["beauty"]["duplicate_interactions_dropped"] == 1
    assert pc.sum(pc.list_value_length(read(tmp_path, "sequences.parquet").column("item_ids"))).as_py() == 25


@pytest.mark.parametrize("raw, clean, kinds", [
    ("Shampoo &amp; Care", "Shampoo & Care", ["html entities"]),
    ("L&#39;Or&eacute;al &quot;Elvive&quot;", "L'Oréal \"Elvive\"", ["html entities"]),
    ("Glow&amp;reg; Serum", "Glow® Serum", ["html entities"]),  # double-escaped
    ("Oil&#x2122;", "Oil™", ["html entities"]),
    ("AT&T and &foo; stay", "AT&T and &foo; stay", []),  # not an entity / unknown: kept as is
    ("Lip\x07stick\u200b Balm\ufeff", "Lip stick Balm", ["control characters", "whitespace"]),
    ("  two\tlines\n\nof  text ", "two lines of text", ["whitespace"]),
    ("Cre\u0301me", "Cr\u00e9me", ["unicode normalization"]),  # combining accent -> one code point
    ("Already clean", "Already clean", []),
    ("", "", []),
])
def test_clean_text_repairs_markup_controls_and_whitespace(raw, clean, kinds):
    from grlm_ray.stages.prepare.core import clean_text

    assert clean_text(raw) == (clean, kinds)


def test_item_text_is_cleaned_once_counted_and_recoverable(tmp_path):
    """Entities, controls and stray whitespace in the meta file never reach the items table; every
    repaired value is a 'repaired' rejects row naming row and field, its source text is in raw_text, the
    manifest counts them per field; data.clean_text=false keeps the text as read."""
    write_raw(tmp_path)
    meta_path = tmp_path / "meta_Beauty.json.gz"
    with gzip.open(meta_path, "rb") as f:
        lines = f.read().decode().splitlines()
    lines[1] = ("{'asin': 'B', 'title': 'Conditioner &amp;amp; Mask\\x07  ', 'brand': 'L&#39;Or\\u00e9al', "
                "'categories': [['Beauty', ' Hair &amp; Care ', 'Hair & Care']], 'description': 'Soft\\n\\nhair'}")
    with gzip.open(meta_path, "wb") as f:
        f.write("\n".join(lines).encode() + b"\n")
    m = prepare(raw_config(tmp_path))
    items = {r["item_id"]: r for r in read(tmp_path, "items.parquet").to_pylist()}
    b = items["B"]
    assert b["title"] == "Conditioner & Mask" and b["brand"] == "L'Oréal" and b["description"] == "Soft hair"
    assert b["categories"] == ["Beauty", "Hair & Care"]
    assert items["A"]["title"] == "Shampoo & Care"
    raw = {(r["item_id"], r["field"]): r["raw"] for r in read(tmp_path, "raw_text.parquet").to_pylist()}
    assert raw[("B", "title")] == "Conditioner &amp;amp; Mask\x07  " and raw[("B", "brand")] == "L&#39;Or\u00e9al"
    assert json.loads(raw[("B", "categories")]) == ["Beauty", " Hair &amp; Care ", "Hair & Care"]
    assert raw[("A", "title")] == "Shampoo &amp; Care" and ("C", "title") not in raw
    rej = [r for r in read(tmp_path, "rejects.parquet").to_pylist() if r["reason"].startswith("text cleaned")]
    row_b = [r["item_id"] for r in read(tmp_path, "items.parquet").to_pylist()].index("B")
    title_b = next(r for r in rej if r["field"] == "title" and r["reason"].endswith("item B"))
    assert title_b["action"] == "repaired" and title_b["line"] == row_b
    assert "html entities" in title_b["reason"] and "control characters" in title_b["reason"]
    cleaned = m["info"]["domains"]["beauty"]["text_cleaned"]
    assert cleaned["title"] == 2 and cleaned["brand"] == 1 and cleaned["categories"] == 1
    assert len(rej) == sum(cleaned.values()) == len(raw)
    kept = prepare(raw_config(tmp_path, **{"run.name": "t2", "data.clean_text": "false"}))
    items2 = {r["item_id"]: r for r in Store(str(tmp_path / "runs")).read_table("t2/prepare/items.parquet").to_pylist()}
    assert items2["B"]["title"] == "Conditioner &amp;amp; Mask\x07  " and "text_cleaned" not in kept["info"]["domains"]["beauty"]
