"""The whole pipeline, stage by stage, over one resolved config (used by `grlm demo` and jobs/)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from grlm_ray.config import AmazonRawSource, BundleSource, ByoSource, GrlmConfig
from grlm_ray.errors import ConfigError
from grlm_ray import registry
from grlm_ray.registry import DEMO_STAGES, STAGES, reads, upstream
from grlm_ray.storage import Store
from grlm_ray.tracking import log_stage

log = logging.getLogger(__name__)
__all__ = ["DEMO_STAGES", "STAGES", "check_inputs", "format_summary", "reads", "run_pipeline", "upstream"]


def check_inputs(cfg: GrlmConfig) -> list[str]:
    """Cross-field and filesystem checks before anything expensive starts; returns the problems."""
    from grlm_ray.prepare import resolve_path
    from grlm_ray.prepare.amazon_raw import default_files

    problems = []
    for name, src in cfg.data.domains.items():
        paths: list[Path] = []
        if isinstance(src, AmazonRawSource):
            d = resolve_path(cfg.data.base_dir, src.dir)
            rf, mf = default_files(src.category)
            paths = [resolve_path(str(d), src.reviews_file or rf), resolve_path(str(d), src.meta_file or mf)]
        elif isinstance(src, BundleSource):
            d = resolve_path(cfg.data.base_dir, src.dir)
            paths = [d / "items.parquet", d / "sequences.parquet"]
        elif isinstance(src, ByoSource):
            paths = [resolve_path(cfg.data.base_dir, src.items), resolve_path(cfg.data.base_dir, src.interactions)]
        for p in paths:
            if not p.is_file():
                problems.append(f"data.domains.{name}: file not found: {p}")
    if cfg.data.mode == "cross_domain":
        for name, src in cfg.data.domains.items():
            if isinstance(src, BundleSource):
                problems.append(f"data.domains.{name}: cross_domain merges by time; bundles have no timestamps")
    if cfg.run.root.startswith("s3://") and not cfg.run.s3.endpoint_url:
        log.info("run.root is on S3 with the default AWS endpoint")
    return problems


def save_resolved_config(cfg: GrlmConfig) -> str:
    store = Store(cfg.run.root, cfg.run.s3)
    rel = f"{cfg.run.name}/config.yaml"
    store.write_bytes(rel, cfg.to_yaml().encode())
    return store.uri(rel)


def run_pipeline(cfg: GrlmConfig, *, stages: tuple[str, ...] = DEMO_STAGES) -> dict[str, Any]:
    """Run the named stages in order; finished stages are skipped, half-done ones resume."""
    problems = check_inputs(cfg)
    if problems:
        raise ConfigError("config checks failed:\n  " + "\n  ".join(problems))
    t0 = time.time()
    results: dict[str, Any] = {"config": save_resolved_config(cfg), "stages": {}}
    for name in stages:
        log.info("stage %s (%s)", name, registry.stage(name).help)
        manifest = registry.stage(name).function()(cfg)
        results["stages"][name] = manifest
        manifest["mlflow_run_id"] = log_stage(cfg, name, manifest, texts=_stage_texts(cfg, name, manifest))
    if "prepare" in stages:
        from grlm_ray.stats import dataset_stats

        results["stats"] = dataset_stats(Store(cfg.run.root, cfg.run.s3).uri(f"{cfg.run.name}/prepare"), cfg.run.s3)
    results["seconds"] = round(time.time() - t0, 2)
    return results


def _stage_texts(cfg: GrlmConfig, stage: str, manifest: dict[str, Any]) -> dict[str, str]:
    """Extra artifacts for a stage's MLflow run (the DeepSpeed JSON, the exported model's manifest)."""
    if stage != "train" or manifest.get("skipped"):
        return {}
    import json

    store = Store(cfg.run.root, cfg.run.s3)
    out = {}
    for rel, name in ((f"{cfg.run.name}/train/deepspeed.json", "deepspeed.json"),
                      (f"{cfg.run.name}/train/model/grlm_model.json", "grlm_model.json")):
        if store.exists(rel):
            out[name] = json.dumps(store.read_json(rel), indent=2)
    return out


def format_summary(results: dict[str, Any]) -> str:
    from grlm_ray.stats import format_stats

    lines = ["", "=== grlm run summary ===", f"config   {results['config']}"]
    for stage, m in results["stages"].items():
        state = "skipped (already complete)" if m.get("skipped") else f"done in {m.get('seconds', 0):.1f}s"
        outs = ", ".join(f"{k.removesuffix('.parquet')}={v:,}" for k, v in m.get("outputs", {}).items())
        lines.append(f"{stage:9s} {state}; {outs}")
        info = m.get("info", {})
        if info.get("rejects"):
            lines.append("          rejects: " + ", ".join(f"{k} x{v}" for k, v in info["rejects"].items()))
        if stage == "ctg" and "legality_rate" in info:
            b, a = info["before_resolution"], info["after_resolution"]
            lines.append(f"          legality {info['legality_rate']:.3f} (first try {info['legality_rate_first_try']:.3f}), "
                         f"repaired {info['repaired_items']}, collisions {b['colliding_items']} -> {a['colliding_items']} items, "
                         f"unique terms {a['unique_terms']}, items/s {info['items_per_second']}")
        if stage == "compress" and "sweep" in info:
            for r in info["sweep"]:
                lines.append(f"          K={r['k']!s:>5}: vocabulary {r['vocab']:,}, colliding items after mapping "
                             f"{r['colliding_items_mapped']:,}, after re-resolution {r['colliding_items_after']:,}")
        if stage == "sft" and "samples" in info:
            lines.append("          samples " + ", ".join(f"{k}={v:,}" for k, v in sorted(info["samples"].items()))
                         + f" (terms: {info['terms_source']})")
        if stage == "train" and "plan" in info:
            tk = info["tokens"]
            lines.append(f"          {info['strategy']}{'' if info['zero_stage'] is None else ' ZeRO-' + str(info['zero_stage'])}, "
                         f"{info['steps']} steps, loss {info['first_loss']:.3f} -> {info['final_loss']:.3f}, "
                         f"{info['tokens_per_s']} tokens/s, padding waste {tk['padding_waste']:.1%}, "
                         f"{info['backbone']['parameters']:,} parameters; model: {info['model_dir']}")
        if stage == "eval" and "metrics" in info:
            from grlm_ray.evaluate import format_metrics

            lines += format_metrics(info)
        if stage == "baseline" and "metrics" in info:
            m, p = info["metrics"], info["popularity"]
            lines.append(f"          {info['protocol']['model']}: R@10 {m['recall_at_10']:.4f} N@10 {m['ndcg_at_10']:.4f} "
                         f"vs popularity R@10 {p['recall_at_10']:.4f} N@10 {p['ndcg_at_10']:.4f} "
                         f"({m['users']} users; loss {info['loss_first']} -> {info['loss_last']}, "
                         f"train {info['train_seconds']}s)")
    if "stats" in results:
        lines += ["", format_stats(results["stats"])]
    lines.append(f"\ntotal {results['seconds']:.1f}s")
    return "\n".join(lines)
