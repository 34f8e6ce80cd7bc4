"""grlm_ray/core/tracking.py, the one owner of MLflow: runs land in the config's store and experiment, tagged.
A real MLflow sqlite store; no Ray."""

from mlflow.tracking import MlflowClient

from grlm_ray.core.config import load_config
from grlm_ray.core.tracking import experiment_name, log_bytes, log_stage, open_run, run_name, tracking_uri


def test_runs_are_opened_tagged_and_nested_in_the_configs_store(tmp_path):
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=t1"])
    with open_run(cfg, "compress", run_name(cfg, "sweep")) as parent:
        log_bytes(b"\x89PNG fake bytes", "plot.png")
        with open_run(cfg, "compress", "t1-k8", parent_run_id=parent.info.run_id, tags={"grlm.compress_k": "8"}) as child:
            pass
    client = MlflowClient(tracking_uri(cfg))
    assert tracking_uri(cfg).startswith("sqlite:///") and str(tmp_path) in tracking_uri(cfg)
    exp = client.get_experiment_by_name(experiment_name(cfg))
    p, c = client.get_run(parent.info.run_id), client.get_run(child.info.run_id)
    assert p.info.experiment_id == c.info.experiment_id == exp.experiment_id
    assert p.data.tags["grlm.run"] == "t1" and p.data.tags["grlm.stage"] == "compress"
    assert c.data.tags["mlflow.parentRunId"] == parent.info.run_id and c.data.tags["grlm.compress_k"] == "8"
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["plot.png"]


def test_a_stage_run_logs_its_registry_sections_and_numbers(tmp_path):
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=t2", "eval.num_beams=7"])
    manifest = {"config_hash": "abc", "seconds": 1.5, "outputs": {"predictions.parquet": 10},
                "info": {"metrics": {"recall@10": 0.25}, "note": "text is not a metric"}}
    run_id = log_stage(cfg, "eval", manifest)
    run = MlflowClient(tracking_uri(cfg)).get_run(run_id)
    assert run.data.params["eval/num_beams"] == "7" and not any(k.startswith("model/") for k in run.data.params)
    assert run.data.metrics["metrics/recall_at_10"] == 0.25 and run.data.metrics["outputs/predictions.parquet"] == 10
    assert run.data.tags["grlm.config_hash"] == "abc" and run.data.tags["grlm.stage"] == "eval"
    assert log_stage(cfg, "eval", {**manifest, "skipped": True}) is None  # a skipped stage logs nothing


def _open_store(root: str) -> str:
    cfg = load_config(None, [f"run.root={root}"])
    uri = tracking_uri(cfg)
    MlflowClient(uri).search_experiments(max_results=1)
    return uri


def test_grlm_commands_started_at_once_on_a_fresh_root_share_one_sqlite_store(tmp_path):
    """Two processes that open the default store of a new root together (two grlm commands run in parallel)
    both get it; without the lock both ran MLflow's migrations and one failed ('duplicate column name')."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(3) as pool:
        uris = pool.map(_open_store, [str(tmp_path)] * 3)
    assert len(set(uris)) == 1 and (tmp_path / "mlflow.db").exists()


def test_a_catalog_of_several_domains_has_its_own_experiment():
    """One MLflow experiment per dataset: a joint catalog's runs are not mixed into its first domain's."""
    from grlm_ray.core.config import load_config

    joint = load_config(None, ["data.mode=joint", "data.domains={a: {kind: synthetic}, b: {kind: synthetic}}"])
    assert experiment_name(joint) == "grlm-a+b"
    assert experiment_name(load_config(None, [])) == f"grlm-{next(iter(load_config(None, []).data.domains))}"
    assert experiment_name(load_config(None, ["tracking.experiment=mine"])) == "mine"
