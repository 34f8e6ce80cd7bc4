"""`ray job submit` for real: a Ray head started with `ray start --head` on 127.0.0.1, the demo pipeline
submitted with jobs/runtime_env.yaml (working dir uploaded), waited for, and its outputs checked."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, free_port, non_loopback_listeners
from grlm_ray.core.storage import Store
from grlm_ray.stages.train import stored_checkpoints

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` in its own process group on loopback; every port chosen free. One head for the
    module's jobs, as on a cluster (each job has its own run root): the job API's address, the CLI's environment
    and the head's pid."""
    tmp_path = tmp_path_factory.mktemp("ray-head")
    ports = {k: free_port() for k in ("port", "dashboard-port", "ray-client-server-port",
                                     "dashboard-agent-listen-port", "metrics-export-port", "runtime-env-agent-port")}
    # token authentication (Ray's default for new clusters): the head and the CLI read ~/.ray/auth_token
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
           "--object-store-memory=300000000", "--disable-usage-stats"] + [f"--{k}={v}" for k, v in ports.items()]
    log = open(tmp_path / "ray_head.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError((tmp_path / "ray_head.log").read_text()[-3000:])
            r = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                               capture_output=True, text=True)
            if r.returncode == 0:
                break
            time.sleep(2)
        else:
            raise RuntimeError("the Ray head's job API did not come up:\n"
                               + (tmp_path / "ray_head.log").read_text()[-3000:])
        # `ray start` turns --node-ip-address=127.0.0.1 into the machine's reachable address (GCS, raylet and
        # agents then listen on every interface) unless told the cluster is this one machine
        # (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, as in the README's command)
        assert non_loopback_listeners(proc.pid) == []
        yield address, env, proc.pid
    finally:  # also when the head never came up: leave no Ray processes behind
        _stop_head(proc, log, ports["port"])


def _stop_head(proc, log, gcs_port):
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()
    # `ray start` recorded this head as the machine's current cluster; `ray stop` would remove the record
    # but also every other Ray on the machine. A stale record makes Ray's State API clients (Ray Train's
    # placement-group cleaner) try the dead head, so remove it when it is ours.
    record = Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray" / "ray_current_cluster"
    if record.is_file() and record.read_text().strip() == f"127.0.0.1:{gcs_port}":
        record.unlink()


def test_ray_job_submit_runs_the_demo_pipeline(ray_head, tmp_path, model_cache):
    address, env, head_pid = ray_head
    root = tmp_path / "runs"
    overrides = [f"run.root={root}", "ray.address=auto", "ray.progress_bars=false",
                 "data.domains.demo.num_items=150", "data.domains.demo.num_users=300", "ctg.limit=1",
                 "ctg.uncovered=words", "ctg.retries=0", "ctg.llm.max_new_tokens=16",
                 f"ctg.llm.cache_dir={model_cache}", f"model.cache_dir={model_cache}", *TINY,
                 "train.max_steps=4", "eval.limit_users=6", "eval.num_beams=4", "eval.max_new_tokens=16"]
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--runtime-env", "jobs/runtime_env.yaml",
           "--submission-id", "grlm-demo-test", "--", sys.executable, "jobs/grlm.py", "demo", "configs/demo.yaml",
           *overrides]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert "succeeded" in (r.stdout + r.stderr).lower()
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, "grlm-demo-test"], env=env,
                            capture_output=True, text=True)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    run = root / "demo"
    for rel in ("prepare/items.parquet", "ctg/terms.parquet", "sft/sft.parquet", "train/model/model.safetensors",
                "eval/predictions.parquet"):
        assert (run / rel).is_file(), rel
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["model"]["overall"]["users"] == 6 and metrics["protocol"]["constrained"]


def test_a_stopped_training_job_resubmitted_resumes_from_its_checkpoint(ray_head, tmp_path, model_cache):
    """As a cluster user would: submit without waiting, follow the job with Ray's own commands, stop it once a
    checkpoint is written, submit it again: the training resumes from that checkpoint and ends at the planned
    step count (the same as an uninterrupted run's)."""
    address, env, head_pid = ray_head
    root = tmp_path / "runs"
    steps = 60
    overrides = [f"run.root={root}", "run.name=resume", "ray.address=auto", "ray.progress_bars=false",
                 "data.domains.demo.num_items=150", "data.domains.demo.num_users=300", "ctg.method=lexical",
                 f"model.cache_dir={model_cache}", *TINY, "train.epochs=20", f"train.max_steps={steps}",
                 "train.checkpoint_every=10",
                 "tracking.enabled=false"]
    ray_cli = [str(BIN / "ray"), "job"]

    def submit(sid: str, wait: bool) -> subprocess.CompletedProcess:
        cmd = [*ray_cli, "submit", "--address", address, "--runtime-env", "jobs/runtime_env.yaml",
               "--submission-id", sid, *([] if wait else ["--no-wait"]), "--", sys.executable, "jobs/grlm.py",
               "train", "configs/demo.yaml", *overrides]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)

    def ray_job(*args: str) -> str:
        r = subprocess.run([*ray_cli, *args, "--address", address], env=env, capture_output=True, text=True, timeout=120)
        return r.stdout + r.stderr

    first = submit("grlm-train-1", wait=False)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    ckpts = root / "resume" / "train" / "ray"
    deadline = time.time() + 900
    while time.time() < deadline:
        done = [p for p in ckpts.glob("*/checkpoint_*/meta.json")] if ckpts.is_dir() else []
        if done:
            break
        assert "FAILED" not in ray_job("status", "grlm-train-1").upper(), ray_job("logs", "grlm-train-1")[-4000:]
        time.sleep(3)
    else:
        raise AssertionError("no checkpoint within 15 minutes:\n" + ray_job("logs", "grlm-train-1")[-4000:])
    # with the job's driver and training workers running: torch.distributed's rendezvous store (a TCPStore on
    # the rank-0 training worker) listens on every interface and torch has no bind address for it (docs/
    # reference.md, "Ray"): that one is allowed, nothing else
    outside = non_loopback_listeners(head_pid)
    assert len(outside) <= 1 and all(x.startswith("ray::RayTrainWorker ") for x in outside), outside
    ray_job("stop", "grlm-train-1")
    deadline = time.time() + 120
    while "STOPPED" not in ray_job("status", "grlm-train-1").upper() and time.time() < deadline:
        time.sleep(2)
    assert "STOPPED" in ray_job("status", "grlm-train-1").upper()
    # the newest checkpoint every rank finished uploading (the stop may land between an upload and Ray Train
    # recording it: the resume must still find it)
    (run_dir,) = [p for p in ckpts.iterdir() if p.is_dir()]
    complete = stored_checkpoints(Store(str(root)), f"resume/train/ray/{run_dir.name}")
    assert complete, sorted(str(p.relative_to(ckpts)) for p in ckpts.rglob("*"))
    stopped_at = complete[-1][0]
    manifest = json.loads((root / "resume" / "train" / "_manifest.json").read_text())
    assert manifest["status"] == "running" and stopped_at < steps  # stopped half-way

    # resubmitted with an edited config: refused before any work, naming the field; the checkpoint stays
    edited = subprocess.run([*ray_cli, "submit", "--address", address, "--runtime-env", "jobs/runtime_env.yaml",
                             "--submission-id", "grlm-train-edited", "--", sys.executable, "jobs/grlm.py", "train",
                             "configs/demo.yaml", *overrides, "train.learning_rate=0.0123"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    logs = ray_job("logs", "grlm-train-edited")
    assert edited.returncode != 0 and "train.learning_rate: " in logs and "-> 0.0123" in logs, logs[-4000:]
    assert "stage 'train' stopped half-way" in logs
    assert stored_checkpoints(Store(str(root)), f"resume/train/ray/{run_dir.name}")[-1][0] == stopped_at

    second = submit("grlm-train-2", wait=True)
    out = second.stdout + second.stderr
    assert second.returncode == 0 and "succeeded" in out.lower(), out[-6000:]
    assert "resuming a run that stopped half-way" in ray_job("logs", "grlm-train-2")
    manifest = json.loads((root / "resume" / "train" / "_manifest.json").read_text())
    info = manifest["info"]
    assert manifest["status"] == "complete" and info["steps"] == steps
    assert info["resumed_from_step"] == stopped_at
    assert info["optimizer_digest_saved"] == info["optimizer_digest_loaded"]  # the optimizer state came back whole
    assert (root / "resume" / "train" / "model" / "model.safetensors").is_file()

