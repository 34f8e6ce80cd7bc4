"""The prepared Amazon 2014 bundles in ../shared and `grlm data stats`."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from grlm_ray.cli import main
from grlm_ray.core.config import load_config
from grlm_ray.stages.prepare import prepare
from grlm_ray.lib.stats import dataset_stats
from grlm_ray.core.storage import Store


def test_stats_on_prepared_beauty_bundle(shared_data, capsys):
    assert main(["data", "stats", str(shared_data / "beauty")]) == 0
    out = capsys.readouterr().out
    assert "22,363" in out and "12,101" in out and "194,687" in out
    assert main(["data", "stats", str(shared_data / "beauty"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["users"], s["items"], s["interactions"]) == (22363, 12101, 194687)
    assert s["sequence_length"]["min"] == 5 and s["sequence_length"]["max"] == 50


def test_prepare_bundle_keeps_sequences_and_provided_terms(shared_data, tmp_path):
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=b", f"data.base_dir={shared_data}",
                             "data.domains={beauty: {kind: bundle, dir: beauty}}"])
    m = prepare(cfg)
    assert m["outputs"]["sequences.parquet"] == 22363 and m["outputs"]["terms.parquet"] == 12100
    store = Store(str(tmp_path))
    seqs = {r["user_id"]: r["item_ids"] for r in store.read_table("b/prepare/sequences.parquet").to_pylist()}
    raw = pq.read_table(shared_data / "beauty" / "sequences.parquet").to_pylist()
    for r in raw[:500] + raw[-500:]:
        assert seqs[str(r["user_id"])] == [str(i) for i in r["item_ids"]]
    terms = store.read_table("b/prepare/terms.parquet")
    assert set(terms.column("source").to_pylist()) == {"provided"}
    assert all(len(t) == 5 for t in terms.column("terms").to_pylist())
    assert dataset_stats(store.uri("b/prepare"))["interactions"] == 194687
    rej = store.read_table("b/prepare/rejects.parquet").to_pylist()
    cleaned = [r for r in rej if r["reason"].startswith("text cleaned")]
    assert [(r["action"], r["field"]) for r in rej if r not in cleaned] == [("noted", "tid")]  # item 315: no TID
    # the authors' titles carry HTML entities (&amp; ...): cleaned in prepare, counted, source text kept
    import re

    titles = store.read_table("b/prepare/items.parquet").column("title").to_pylist()
    assert not any(re.search(r"&(amp|quot|#39|reg|nbsp);", t) for t in titles)
    n = m["info"]["domains"]["beauty"]["text_cleaned"]["title"]
    assert n == len(cleaned) == store.read_table("b/prepare/raw_text.parquet").num_rows > 0


def test_prepare_bundle_without_its_terms_writes_no_provided_terms(shared_data, tmp_path):
    """``with_terms: false``: the bundle's TIDs are left out (the catalog and sequences are the same)."""
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=b", f"data.base_dir={shared_data}",
                             "data.domains={toys: {kind: bundle, dir: toys, with_terms: false}}"])
    m = prepare(cfg)
    assert m["outputs"]["sequences.parquet"] > 0 and not m["outputs"].get("terms.parquet")
    assert not Store(str(tmp_path)).exists("b/prepare/terms.parquet")
    # Toys carries each item's category path: prepare keeps it (statistical CTG and the embeddings read it)
    items = {r["item_id"]: r for r in Store(str(tmp_path)).read_table("b/prepare/items.parquet").to_pylist()}
    raw = pq.read_table(shared_data / "toys" / "items.parquet", columns=["item_id", "categories"]).to_pylist()
    assert sum(1 for r in raw if r["categories"]) > 0.99 * len(raw)
    for r in raw[:300]:
        assert items[str(r["item_id"])]["categories"] == list(dict.fromkeys(r["categories"] or []))


@pytest.mark.ray
@pytest.mark.slow
def test_a_bundle_column_read_as_the_description_gives_untitled_items_text(shared_data, tmp_path):
    """``description: idgenrec_lexid``: Sports' items without a title (74%) get IDGenRec's textual id as their
    description; a column the bundle does not have is refused naming the file and the field."""
    from grlm_ray.core.errors import DataError

    over = [f"run.root={tmp_path}", "run.name=s", f"data.base_dir={shared_data}"]
    cfg = load_config(None, over + ["data.domains={sports: {kind: bundle, dir: sports, description: idgenrec_lexid}}"])
    prepare(cfg)
    items = Store(str(tmp_path)).read_table("s/prepare/items.parquet").to_pylist()
    raw = {str(r["item_id"]): r["idgenrec_lexid"] for r in pq.read_table(
        shared_data / "sports" / "items.parquet", columns=["item_id", "idgenrec_lexid"]).to_pylist()}
    assert len(items) == len(raw) == 18357
    assert sum(not r["title"] for r in items) > 13000 and all(r["description"] for r in items)
    assert all(r["description"] == raw[r["item_id"]] for r in items)
    bad = load_config(None, [f"run.root={tmp_path}", "run.name=s2", f"data.base_dir={shared_data}",
                             "data.domains={sports: {kind: bundle, dir: sports, description: summary}}"])
    with pytest.raises(DataError, match=r"sports/items.parquet.*summary|summary.*sports/items.parquet"):
        prepare(bad)


def test_joint_bundles_namespace_three_domains(shared_data, tmp_path, ray_local):
    cfg = load_config(str(__import__("pathlib").Path(__file__).parents[1] / "configs" / "joint_bundles.yaml"),
                      [f"run.root={tmp_path}", f"data.base_dir={shared_data}"])
    prepare(cfg)
    s = dataset_stats(Store(str(tmp_path)).uri("joint-bst/prepare"))
    assert s["users"] == 22363 + 35598 + 19412
    assert s["items"] == 12101 + 18357 + 11924
    assert s["interactions"] == 194687 + 296337 + 167597
    assert s["test_targets_per_domain"] == {"beauty": 22363, "sports": 35598, "toys": 19412}


def test_cli_help_does_not_import_heavy_modules():
    code = ("import sys; from grlm_ray.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit: pass\n"
            "heavy = [m for m in ('ray', 'torch', 'vllm', 'deepspeed', 'transformers', 'mlflow') if m in sys.modules]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
