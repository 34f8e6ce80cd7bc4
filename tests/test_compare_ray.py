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
    out = compression_comparison(cfg)
    rows = {r["variant"]: r for r in out["rows"]}
    assert list(rows) == ["raw", "k20", "k40"]
    assert rows["k20"]["vocab"] < rows["raw"]["vocab"]
    for r in rows.values():
        assert r["users"] == 5 and 0 <= r["recall_at_10"] <= 1 and r["vr_at_10"] == 1.0
        assert r["train_loss_last"] is not None
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
