"""Semantic compression: the core-term mapping on hand-built vectors, and a real sweep on Beauty."""

import numpy as np
import pytest

from grlm_ray.stages.compress import apply_map, core_term_map


def test_core_terms_merge_near_synonyms_and_keep_tids_distinct():
    vocab = ["cleanser", "cleansing", "wash", "lipstick", "lip-color", "mascara"]
    e = np.array([[1, 0, 0], [0.99, 0.1, 0], [0.97, 0.2, 0], [0, 1, 0], [0.1, 0.99, 0], [0, 0, 1]], np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    m = core_term_map(vocab, e, 3, seed=0)
    assert len(set(m.values())) == 3
    assert m["cleanser"] == m["cleansing"] == m["wash"] and m["lipstick"] == m["lip-color"] != m["mascara"]
    core = m["cleanser"]
    # two terms of one TID mapping to the same core: the second keeps its own word
    assert apply_map([["cleanser", "wash", "mascara"]], m) == [[core, "wash" if core != "wash" else "cleanser", "mascara"]]
    assert core_term_map(vocab, e, 10) == {t: t for t in vocab}


@pytest.mark.slow
def test_sweep_on_authors_beauty_tids_with_real_encoder(shared_data, tmp_path):
    from grlm_ray.core.config import load_config
    from grlm_ray.flows.pipeline import run_pipeline
    from grlm_ray.core.storage import Store

    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=b", f"data.base_dir={shared_data}",
                             "data.domains={beauty: {kind: bundle, dir: beauty}}", "compress.source=provided",
                             "compress.ks=[1000, 3000]"])
    res = run_pipeline(cfg, stages=("prepare", "compress"))
    rows = res["stages"]["compress"]["info"]["sweep"]
    raw, k1000, k3000 = rows
    print("\n" + "\n".join(str(r) for r in rows))
    assert k1000["core_terms"] == 1000 and k3000["core_terms"] == 3000
    assert k1000["vocab"] < k3000["vocab"] < raw["vocab"]
    assert k1000["colliding_items_mapped"] >= k3000["colliding_items_mapped"] >= raw["colliding_items_mapped"]
    assert all(r["colliding_items_after"] == 0 for r in rows[1:])
    assert Store(str(tmp_path)).read_table("b/compress/k1000/terms.parquet").num_rows == 12100
    import mlflow

    from grlm_ray.core.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(cfg))
    runs = mlflow.search_runs(experiment_names=["grlm-beauty"], filter_string="tags.`grlm.stage` = 'compress'")
    assert {"1000", "3000", "raw"} <= set(runs["tags.grlm.compress_k"].dropna())
