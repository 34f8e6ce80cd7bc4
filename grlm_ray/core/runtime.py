"""One place that starts or joins Ray, with defaults that work on a 2-core laptop, and the console.

Local: a head on 127.0.0.1 only (dashboard included, on loopback), a small object store, no usage stats. Ray Data gets a
no-progress timeout (a stall becomes an error, not a hang) and actor pools get fractional CPUs so the
read tasks still find a CPU (on 2 cores the default settings deadlock). Cluster: join by address.

Console (``configure_console``): grlm's own lines, one progress bar per long stage and the summary. Ray
Data's progress snapshots and execution plans, MLflow's store set-up and the libraries' weight-loading bars
go to Ray's log files (their folder is printed once) unless ``grlm -v``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

from grlm_ray.core.config import RayConfig

log = logging.getLogger(__name__)
_VERBOSE = False
# library chatter that is not the user's business unless -v: read by the libraries at import, inherited by
# the Ray workers a local head starts
_QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",   # transformers' "Loading weights" / "Writing model shards" bars
    "MLFLOW_LOGGING_LEVEL": "WARNING",     # "Creating initial MLflow database tables..."
}


def configure_console(verbose: bool = False) -> None:
    """Logging for a `grlm` command: INFO lines of grlm (DEBUG with ``verbose``), libraries at WARNING."""
    global _VERBOSE
    _VERBOSE = verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose:
        os.environ["GRLM_VERBOSE"] = "1"  # read where models load (lib.models.quiet_loading), here and in workers
    else:
        for k, v in _QUIET_ENV.items():
            os.environ.setdefault(k, v)
        if shutil.which("nvidia-smi") is None:  # DeepSpeed's accelerator probe warns on every CPU-only import
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        for name in ("mlflow", "alembic", "urllib3", "filelock", "httpx", "sentence_transformers", "faiss"):
            logging.getLogger(name).setLevel(logging.WARNING)

_LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # keep every Ray listener on loopback
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_DEDUP_LOGS": "1",
}


def object_store_bytes(cfg: RayConfig, data_bytes: int = 0) -> int:
    """A local head's object store: ``object_store_memory_mb`` at least, else sized from the data the stage
    ships to its actors (``data_bytes``: 2.5x, for the object and the copies in flight), at most 40% of
    the machine's memory."""
    floor = cfg.object_store_memory_mb * 1024 * 1024
    if data_bytes <= 0:
        return floor
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    return int(max(floor, min(2.5 * data_bytes, 0.4 * total)))


def init_ray(cfg: RayConfig, *, runtime_env: dict[str, Any] | None = None, data_bytes: int = 0) -> Any:
    """Start (or join) Ray and configure Ray Data. Returns the ``ray`` module. ``data_bytes``: what the
    caller will put in the object store (sizes a local head's store; see ``object_store_bytes``)."""
    # Before `import ray`: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER into a constant at import
    # time, and only with it at 0 does a local node resolve its IP to loopback.
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not address:
        for k, v in _LOCAL_ENV.items():
            os.environ.setdefault(k, v)
    import ray  # lazy: keeps `grlm --help` and unit tests fast

    if not ray.is_initialized():
        if address:
            log.info("joining Ray cluster at %s", address)
            ray.init(address=address, runtime_env=_with_cluster_address(runtime_env, address), log_to_driver=True)
        else:
            extra = {"_metrics_export_port": cfg.metrics_export_port} if cfg.metrics_export_port else {}
            # The head's GCS port is chosen here so that every worker of this job knows its cluster
            # (RAY_ADDRESS): Ray Train's PlacementGroupCleaner looks its controller up through the state API,
            # which otherwise scans the machine for Ray instances — with two local heads (a training and a
            # test run) it asked the other one, found no controller, and removed the live training's
            # placement group (measured: a Beauty training killed at step 4,600).
            gcs_port = free_port()
            env = dict(runtime_env or {})
            env["env_vars"] = {**(env.get("env_vars") or {}), "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}
            os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)
            try:
                ray.init(
                    address="local",  # a new head even when a `ray start` cluster runs on this machine
                    num_cpus=cfg.num_cpus,
                    object_store_memory=object_store_bytes(cfg, data_bytes),
                    include_dashboard=cfg.include_dashboard,
                    dashboard_host="127.0.0.1",
                    dashboard_port=cfg.dashboard_port or free_port(),
                    _node_ip_address="127.0.0.1",
                    runtime_env=env,
                    log_to_driver=True,
                    configure_logging=False,
                    **extra,
                )
            finally:
                os.environ.pop("RAY_GCS_SERVER_PORT", None)  # not for heads this process starts later
    configure_data_context(cfg)
    if not _VERBOSE:
        _ray_logs_to_files(ray)
    return ray


def _with_cluster_address(runtime_env: dict[str, Any] | None, address: str) -> dict[str, Any] | None:
    """The runtime env of a job joining ``address``, with RAY_ADDRESS set to that cluster's GCS for its workers.
    Ray Train's PlacementGroupCleaner finds its controller through the state API, which without RAY_ADDRESS
    resolves ``auto`` itself (the head `ray start` last recorded on the machine, else any GCS it finds). Seen
    once: a submitted joint training's cleaner declared its live controller dead and removed the workers a
    minute after a second head was started on the machine (a test's); a test with a second head did not
    reproduce it, so this closes the resolution path rather than a proven cause. ``auto`` resolves to what the
    job's driver was given (`ray job submit` sets RAY_ADDRESS); a Ray Client address (``ray://``) or a key the
    job's own runtime env sets is left alone."""
    gcs = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
    if not gcs or gcs == "auto" or "://" in gcs:
        return runtime_env
    job_env = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "")
    try:
        job_vars = (json.loads(job_env).get("runtime_env") or {}).get("env_vars") or {} if job_env else {}
    except (ValueError, AttributeError):
        job_vars = {}
    env = dict(runtime_env or {})
    if "RAY_ADDRESS" in job_vars or "RAY_ADDRESS" in (env.get("env_vars") or {}):
        return runtime_env
    env["env_vars"] = {**(env.get("env_vars") or {}), "RAY_ADDRESS": gcs}
    return env


def console_verbose() -> bool:
    """Whether the command runs with -v (everything on the console)."""
    return _VERBOSE


def _ray_logs_to_files(ray: Any) -> None:
    """Ray Data's INFO lines (execution plans, progress snapshots on a non-terminal) stay in its log file;
    warnings and errors still reach the console. Says once where the files are."""
    for h in logging.getLogger("ray.data").handlers:
        if not isinstance(h, logging.FileHandler) and type(h).__name__ != "SessionFileHandler":
            h.setLevel(logging.WARNING)
    global _LOGS_SHOWN
    if not _LOGS_SHOWN:
        _LOGS_SHOWN = True
        try:
            logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
        except AttributeError:  # joined a cluster: the logs live on its nodes
            return
        log.info("Ray's own logs: %s (grlm -v shows them here)", logs)


_LOGS_SHOWN = False


def configure_data_context(cfg: RayConfig) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    # A stalled pipeline raises instead of hanging forever (attribute exists on Ray >= 2.40).
    if hasattr(ctx, "execution_no_progress_timeout_s"):
        ctx.execution_no_progress_timeout_s = cfg.no_progress_timeout_s


def actor_pool_kwargs(cfg: RayConfig, size: int, num_gpus: float = 0) -> dict[str, Any]:
    """Keyword arguments for ``Dataset.map_batches`` with a callable class as an actor pool."""
    from ray.data import ActorPoolStrategy

    kw: dict[str, Any] = {"compute": ActorPoolStrategy(size=max(1, size)), "num_cpus": cfg.actor_num_cpus}
    if num_gpus:
        kw["num_gpus"] = num_gpus
    return kw


def metrics_url() -> str | None:
    """Where this Ray node serves its Prometheus metrics (None before ``init_ray``)."""
    import ray

    if not ray.is_initialized():
        return None
    me = ray.get_runtime_context().get_node_id()
    for n in ray.nodes():
        if n["NodeID"] == me and n.get("MetricsExportPort"):
            return f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
    return None


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for local servers started by tests and benchmarks)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
