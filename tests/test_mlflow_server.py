"""MLflow for real: an `mlflow server` (sqlite backend, artifacts in the S3-compatible server) on
127.0.0.1; pipeline stages log to it; their metrics, params, tags linking upstream runs, and artifacts
are found there, and the artifacts are objects in the S3 bucket."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _wait_port, free_port, stop_process

pytestmark = [pytest.mark.services, pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = dict(os.environ, MLFLOW_S3_ENDPOINT_URL=s3_server["endpoint"])
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--serve-artifacts",
           "--artifacts-destination", f"s3://{s3_server['bucket']}/mlflow", "--workers", "1"]
    log = d / "mlflow.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # a liveness bound, not a speed target: on 2 shared cores (a training beside the suite) the server took
        # > 120 s to bind after printing its start-up lines
        _wait_port(port, 300, proc, log)
        yield f"http://127.0.0.1:{port}", s3_server
    finally:
        stop_process(proc)


def test_pipeline_runs_are_found_on_the_mlflow_server_with_s3_artifacts(mlflow_server, ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from grlm_ray.core.config import load_config
    from grlm_ray.flows.pipeline import run_pipeline

    uri, s3 = mlflow_server
    cfg = load_config(None, [f"run.root={tmp_path}", "data.domains.demo.num_items=120", "data.domains.demo.num_users=200",
                             "ray.progress_bars=false", f"tracking.uri={uri}", "tracking.experiment=grlm-server-test"])
    run_pipeline(cfg, stages=("prepare", "embed", "neighbors"))
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("grlm-server-test")
    runs = {r.data.tags["grlm.stage"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"prepare", "embed", "neighbors"}
    nb = runs["neighbors"]
    assert nb.info.run_name.startswith("demo-neighbors-demo-")
    assert nb.data.tags["grlm.upstream.embed"] == runs["embed"].info.run_id
    assert nb.data.tags["grlm.upstream.prepare"] == runs["prepare"].info.run_id
    assert nb.data.metrics["seconds"] > 0 and "neighbors/k" in nb.data.params
    assert runs["prepare"].data.metrics["seconds"] > 0 and any("items" in k for k in runs["prepare"].data.metrics)
    names = {a.path for a in client.list_artifacts(nb.info.run_id)}
    assert {"manifest.json", "config.yaml"} <= names
    local = client.download_artifacts(nb.info.run_id, "config.yaml", str(tmp_path / "dl"))
    assert "neighbors:" in Path(local).read_text()
    # the artifact bytes live in the S3-compatible server, under the configured destination
    keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket=s3["bucket"], Prefix="mlflow/")
            .get("Contents", [])]
    assert any(k.endswith(f"{nb.info.run_id}/artifacts/config.yaml") for k in keys), keys[:10]
