"""MLflow tracking for stage runs (driver / rank 0 only).

Default store: a local sqlite file ``<run.root>/mlflow.db`` (or ``./mlflow.db`` when the root is on S3);
``tracking.uri`` points elsewhere (e.g. an ``mlflow server``). One experiment per dataset
(``grlm-<first domain>``), run names ``<run>-<stage>-<what>-<time>`` where <what> says the TID settings
(and, from SFT on, the backbone and strategy), params flattened with '/', metric keys without spaces or
'@'. Each stage run is tagged with the MLflow runs of the stages it read (``grlm.upstream.<stage>``,
matched by run name, stage and config hash). Skipped stages log nothing.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from grlm_ray.core import registry
from grlm_ray.core.config import GrlmConfig
from grlm_ray.core.run import Run
from grlm_ray.core.storage import read_manifest

log = logging.getLogger(__name__)


_READY: set[str] = set()


def tracking_uri(cfg: GrlmConfig) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    base = Path("." if cfg.run.root.startswith("s3://") else cfg.run.root).expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{base / 'mlflow.db'}"
    if uri not in _READY:
        _create_sqlite_store(uri, base / "mlflow.db.lock")
        _READY.add(uri)
    return uri


def _create_sqlite_store(uri: str, lock: Path) -> None:
    """Create (or migrate) the sqlite store under an exclusive file lock: two grlm commands started at
    once on a fresh root both ran MLflow's schema migrations and one failed ('duplicate column name')."""
    import fcntl

    from mlflow.tracking import MlflowClient

    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def experiment_name(cfg: GrlmConfig) -> str:
    """``tracking.experiment``, else one per dataset: ``grlm-<domain>``, ``grlm-<d1>+<d2>+...`` for a catalog of
    several domains (joint, cross-domain), kept apart from each domain's own runs."""
    return cfg.tracking.experiment or f"grlm-{'+'.join(cfg.data.domains)}"


def model_label(cfg: GrlmConfig) -> str:
    """``<backbone>-tid<N>-<terms>-<strategy>``: the trained model, in its MLflow run names."""
    m, t = cfg.model, cfg.train
    backbone = os.path.basename(m.path.rstrip("/")).split(".")[0] if m.init != "scratch" else \
        f"scratch{m.num_layers}x{m.hidden_size}"
    backbone += "-reinit" if m.init == "reinit" else ""
    strat = f"zero{t.deepspeed.zero_stage}" if t.strategy == "deepspeed" else "ddp"
    return f"{backbone}-tid{cfg.ctg.num_terms}-{cfg.sft.terms}-{strat}"


def run_label(cfg: GrlmConfig, stage: str) -> str:
    """What a stage's run is about, for its MLflow run name."""
    c = cfg.ctg
    tid = f"tid{c.num_terms}" + ("" if c.context == "neighbors" else "-noctx")
    if stage == "baseline":
        return f"sasrec-{cfg.baseline.loss}"
    if stage in ("prepare", "embed", "neighbors"):
        return "-".join(cfg.data.domains)[:40]
    if stage in ("ctg", "compress"):
        return tid
    src = cfg.sft.terms + (f"k{cfg.sft.compress_k}" if cfg.sft.terms == "compress" else "")
    return model_label(cfg).replace(f"-{cfg.sft.terms}-", f"-{src}-")


def upstream_runs(cfg: GrlmConfig, stage: str) -> dict[str, str]:
    """MLflow run ids of the stages ``stage`` read, as finished for this run (name + config hash)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    store = Run.of(cfg).store
    out = {}
    for up in registry.upstream(stage, cfg)[:-1]:
        m = read_manifest(store, cfg.run.name, up)
        if not m or not m.get("config_hash"):
            continue
        found = mlflow.search_runs(
            experiment_names=[experiment_name(cfg)], max_results=1, output_format="list",
            filter_string=f"tags.`grlm.run` = '{cfg.run.name}' and tags.`grlm.stage` = '{up}' "
                          f"and tags.`grlm.config_hash` = '{m['config_hash']}'",
            order_by=["attributes.start_time DESC"])
        if found:
            out[f"grlm.upstream.{up}"] = found[0].info.run_id
    return out


@contextmanager
def open_run(cfg: GrlmConfig, stage: str, name: str, *, run_id: str | None = None,
             parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """The one place a grlm MLflow run is opened: this config's store and experiment, tagged with the run
    name, stage and root (``grlm.*``); ``run_id`` re-opens a run, ``parent_run_id`` nests one."""
    import mlflow

    if not parent_run_id:  # a nested run lives in its parent's store and experiment
        mlflow.set_tracking_uri(tracking_uri(cfg))
        mlflow.set_experiment(experiment_name(cfg))
    if run_id:
        ctx = mlflow.start_run(run_id=run_id)
    elif parent_run_id:
        ctx = mlflow.start_run(run_name=name, nested=True, parent_run_id=parent_run_id)
    else:
        ctx = mlflow.start_run(run_name=name)
    with ctx as run:
        mlflow.set_tags({"grlm.run": cfg.run.name, "grlm.stage": stage, "grlm.root": cfg.run.root, **(tags or {})})
        yield run


def run_name(cfg: GrlmConfig, what: str) -> str:
    """``<run>-<what>-<time>``: how every grlm MLflow run is named."""
    return f"{cfg.run.name}-{what}-{time.strftime('%Y%m%d-%H%M%S')}"


def log_bytes(data: bytes, filename: str) -> None:
    """Attach bytes (a PNG, a CSV) to the active run as ``filename``."""
    import mlflow

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / filename
        path.write_bytes(data)
        mlflow.log_artifact(str(path))


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(obj, list) and obj and all(isinstance(x, (int, float)) for x in obj):
        for i, v in enumerate(obj):
            out[f"{prefix}/{i}"] = v
    else:
        out[prefix] = obj
    return out


def metric_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./]", "_", key.replace("@", "_at_"))


def log_stage(cfg: GrlmConfig, stage: str, manifest: dict[str, Any],
              texts: dict[str, str] | None = None) -> str | None:
    """Log one finished stage; returns the MLflow run id (None when disabled or skipped)."""
    if not cfg.tracking.enabled or manifest.get("skipped"):
        return None
    import mlflow

    existing = (manifest.get("info") or {}).get("mlflow_run_id")  # a stage that logged while it ran
    with open_run(cfg, stage, run_name(cfg, f"{stage}-{run_label(cfg, stage)}"), run_id=existing,
                  tags={"grlm.config_hash": manifest.get("config_hash", ""), **upstream_runs(cfg, stage)}) as run:
        params = {}
        for section in registry.stage(stage).tracked:
            params.update(flatten(getattr(cfg, section).model_dump(mode="json"), section))
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        metrics = {metric_key(k): float(v) for k, v in flatten(manifest.get("info", {})).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics.update({metric_key(f"outputs/{k}"): float(v) for k, v in manifest.get("outputs", {}).items()})
        metrics["seconds"] = float(manifest.get("seconds", 0.0))
        mlflow.log_metrics(metrics)
        mlflow.log_dict(manifest, "manifest.json")
        mlflow.log_text(cfg.to_yaml(), "config.yaml")
        for fname, text in (texts or {}).items():
            mlflow.log_text(text, fname)
        if stage == "train":
            _log_loss_plot(mlflow, run.info.run_id)
        return run.info.run_id


def start_stage_run(cfg: GrlmConfig, stage: str, label: str) -> str:
    """Create the MLflow run of a stage that logs while it runs (training curves); ``log_stage`` finishes it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri(cfg))
    exp = mlflow.set_experiment(experiment_name(cfg))
    client = MlflowClient(tracking_uri(cfg))
    run = client.create_run(exp.experiment_id, run_name=run_name(cfg, f"{stage}-{label}"),
                            tags={"grlm.run": cfg.run.name, "grlm.stage": stage, "grlm.root": cfg.run.root})
    return run.info.run_id


def log_artifact(cfg: GrlmConfig, run_id: str, path: str) -> None:
    """Attach a local file (e.g. a plot) to a run that is already open or finished."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri(cfg)).log_artifact(run_id, path)


def log_diagnostics(cfg: GrlmConfig, report: dict[str, Any]) -> str:
    """One MLflow run (grlm.stage=diagnose) with the diagnostics as metrics and the whole report as JSON."""
    import mlflow

    with open_run(cfg, "diagnose", run_name(cfg, "diagnose"), tags=upstream_runs(cfg, "eval")) as run:
        mlflow.log_params({k: str(v) for k, v in report["format"].items()})
        metrics = {metric_key(f"diagnose/{k}"): float(v) for k, v in flatten(report).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        mlflow.log_metrics(metrics)
        mlflow.log_dict(report, "diagnostics.json")
        return run.info.run_id


def _log_loss_plot(mlflow: Any, run_id: str) -> None:
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "train/loss")
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((m.step, m.value) for m in history)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("IIFT loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    mlflow.log_figure(fig, "loss_curve.png")
    plt.close(fig)
