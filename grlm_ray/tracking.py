"""MLflow tracking for stage runs (driver / rank 0 only).

Default store: a local sqlite file ``<run.root>/mlflow.db`` (or ``./mlflow.db`` when the root is on S3);
``tracking.uri`` points elsewhere (e.g. an ``mlflow server``). One experiment per dataset
(``grlm-<first domain>``), run names ``<run>-<stage>-<time>``, params flattened with '/', metric keys
without spaces or '@'. Skipped stages log nothing.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from grlm_ray.config import GrlmConfig

log = logging.getLogger(__name__)

STAGE_SECTIONS = {"prepare": ("data",), "embed": ("data", "embed"), "neighbors": ("neighbors",),
                  "ctg": ("ctg",), "compress": ("compress",), "sft": ("sft",), "train": ("sft", "model", "train"),
                  "eval": ("eval",)}


def tracking_uri(cfg: GrlmConfig) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    base = Path("." if cfg.run.root.startswith("s3://") else cfg.run.root).expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}"


def experiment_name(cfg: GrlmConfig) -> str:
    return cfg.tracking.experiment or f"grlm-{next(iter(cfg.data.domains))}"


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

    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(experiment_name(cfg))
    name = f"{cfg.run.name}-{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    existing = (manifest.get("info") or {}).get("mlflow_run_id")  # a stage that logged while it ran
    with (mlflow.start_run(run_id=existing) if existing else mlflow.start_run(run_name=name)) as run:
        mlflow.set_tags({"grlm.run": cfg.run.name, "grlm.stage": stage,
                         "grlm.config_hash": manifest.get("config_hash", ""), "grlm.root": cfg.run.root})
        params = {}
        for section in STAGE_SECTIONS.get(stage, ()):
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
    run = client.create_run(exp.experiment_id, run_name=f"{cfg.run.name}-{stage}-{label}-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={"grlm.run": cfg.run.name, "grlm.stage": stage, "grlm.root": cfg.run.root})
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
