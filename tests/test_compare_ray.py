"""The compression comparison end to end on the tiny demo run (CPU): compress K in {20, 40} and raw ->
IIFT + eval for each -> table and plot in MLflow -> `grlm compare EXPERIMENT` prints it."""

import pytest

from conftest import TINY

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_compression_comparison_table_is_in_mlflow(tiny_sft_run, capsys):
    from grlm_ray.cli import main
    from grlm_ray.flows.compare import compression_comparison
    from grlm_ray.core.config import load_config
    from grlm_ray.core.tracking import tracking_uri

    cfg = load_config(None, tiny_sft_run + TINY + [
        "compress.ks=[20,40]", "train.max_steps=3", "eval.limit_users=5", "eval.num_beams=3",
        "eval.max_new_tokens=16", "tracking.experiment=grlm-compare-test",
        # the comparison is tested here, not DDP: one training process per variant (no Ray Train start)
        "train.strategy=single", "train.num_workers=1"])
    # the base run trained and evaluated by hand first: the comparison's raw row is that run, not a second training
    from grlm_ray.core.storage import read_manifest
    from grlm_ray.flows.pipeline import run_pipeline, upstream

    base = run_pipeline(cfg, stages=upstream("eval", cfg))["stages"]
    out = compression_comparison(cfg)
    rows = {r["variant"]: r for r in out["rows"]}
    assert list(rows) == ["raw", "k20", "k40"]
    from grlm_ray.core.run import Run

    for stage in ("train", "eval"):
        assert read_manifest(Run.of(cfg).store, "demo-raw", stage)["started_at"] == base[stage]["started_at"]
    assert rows["raw"]["recall_at_10"] == base["eval"]["info"]["metrics"]["recall_at_10"]
    # the base run is left as it trained: no compress stage of its own (each K variant compresses for its K)
    assert read_manifest(Run.of(cfg).store, cfg.run.name, "compress") is None
    assert rows["k20"]["vocab"] < rows["raw"]["vocab"]
    # fewer terms, fewer term embeddings: the compressed model is smaller (the table shows by how much)
    assert 0 < rows["k20"]["params"] < rows["raw"]["params"]
    for r in rows.values():
        assert r["users"] == 5 and 0 <= r["recall_at_10"] <= 1 and r["vr_at_10"] == 1.0
        assert r["train_loss_last"] is not None and r["train_minutes"] is not None
        assert r["colliding_items_after"] == 0 and r["colliding_items_mapped"] >= 0  # re-resolved: no shared TID
    root = f"{cfg.run.root}/{cfg.run.name}"
    for name in ("comparison.json", "comparison.csv", "comparison.png"):
        assert (__import__("pathlib").Path(root) / "compare" / name).stat().st_size > 0
    # the variants' terms differ: K=20 maps every term to one of at most 20 core terms (+ re-resolution)
    import pyarrow.parquet as pq

    k20 = pq.read_table(f"{cfg.run.root}/demo-k20/sft/terms.parquet").column("terms").to_pylist()
    raw = pq.read_table(f"{cfg.run.root}/demo-raw/sft/terms.parquet").column("terms").to_pylist()
    assert len({t for x in k20 for t in x}) < len({t for x in raw for t in x})
    capsys.readouterr()
    assert main(["compare", "grlm-compare-test", "--tracking-uri", tracking_uri(cfg)]) == 0
    printed = capsys.readouterr().out
    assert "k20" in printed and "k40" in printed and "raw" in printed and out["mlflow_run_id"] in printed
    assert "collide" in printed and "train min" in printed
    # a K added later trains only itself: the variants already trained keep their keys and are reused
    import json
    from pathlib import Path

    def trained(run, stage="train"):
        return json.loads((Path(cfg.run.root) / run / stage / "_manifest.json").read_text())

    before = {r: trained(f"demo-{r}") for r in ("raw", "k20", "k40")}
    # nor compressed again: a K variant's own compress stage (its K only) is not overwritten by the base run's sweep
    compressed = {r: trained(f"demo-{r}", "compress") for r in ("k20", "k40")}
    more = compression_comparison(load_config(None, tiny_sft_run + TINY + [
        "compress.ks=[20,40,60]", "train.max_steps=3", "eval.limit_users=5", "eval.num_beams=3",
        "eval.max_new_tokens=16", "tracking.experiment=grlm-compare-test", "train.strategy=single",
        "train.num_workers=1"]))
    assert [r["variant"] for r in more["rows"]] == ["raw", "k20", "k40", "k60"]
    assert {r: trained(f"demo-{r}") for r in ("raw", "k20", "k40")} == before  # not trained again
    assert {r: trained(f"demo-{r}", "compress") for r in ("k20", "k40")} == compressed
    assert [{c: r[c] for c in ("recall_at_10", "ndcg_at_10", "vocab")} for r in more["rows"][:3]] == \
           [{c: r[c] for c in ("recall_at_10", "ndcg_at_10", "vocab")} for r in out["rows"]]


def test_the_comparison_table_adds_per_domain_columns_for_a_joint_catalog():
    from grlm_ray.flows.compare import format_table

    row = {"variant": "raw", "k": None, "vocab": 900, "colliding_items_mapped": 30, "colliding_items_after": 0,
           "recall_at_10": 0.07, "ndcg_at_10": 0.04, "train_minutes": 12.5, "params": 1_783_424,
           "per_domain": {"beauty": {"recall_at_10": 0.08, "ndcg_at_10": 0.05}, "toys": {"recall_at_10": 0.06,
                                                                                       "ndcg_at_10": 0.03}}}
    lines = format_table([row, {**row, "variant": "k300", "k": 300, "vocab": 300, "per_domain": {}}]).splitlines()
    assert lines[1].split()[:4] == ["raw", "900", "30", "0"] and lines[1].split()[-2:] == ["1.78", "12.5"]
    assert lines[0].split()[-4:] == ["params", "M", "train", "min"]
    assert lines[4].split() == ["variant", "beauty", "toys"]
    assert lines[5].split() == ["raw", "0.0800/", "0.0500", "0.0600/", "0.0300"]
    assert lines[6].split() == ["k300", "-", "-"]
    assert lines[2].split()[-2:] == ["1.78", "12.5"]
    assert format_table([{**row, "params": None}]).splitlines()[1].split()[-2:] == ["-", "12.5"]
    # a long variant name widens the column instead of pushing its row out of line
    long = format_table([row, {**row, "variant": "k1100-random-rare1", "per_domain": {}}]).splitlines()
    ends = [long[0].index("vocab") + 5, long[1].index(" 900") + 4, long[2].index(" 900") + 4]
    assert len(set(ends)) == 1 and long[2].startswith("k1100-random-rare1")
    assert "per domain" not in format_table([{**row, "per_domain": {}}])
