"""The whole pipeline, stage by stage, over one resolved config (used by `grlm demo` and jobs/)."""

from __future__ import annotations

import logging
import time
from typing import Any

from grlm_ray.core import registry
from grlm_ray.core.config import GrlmConfig
from grlm_ray.core.errors import ConfigError
from grlm_ray.core.registry import DEMO_STAGES, STAGES, reads, upstream
from grlm_ray.core.run import Run
from grlm_ray.core.storage import read_manifest
from grlm_ray.core.tracking import log_stage
from grlm_ray.lib.metrics import format_metrics
from grlm_ray.lib.stats import dataset_stats, format_stats

log = logging.getLogger(__name__)
__all__ = ["DEMO_STAGES", "STAGES", "check_inputs", "format_summary", "reads", "run_pipeline", "upstream"]


def check_inputs(cfg: GrlmConfig, stages: tuple[str, ...] = STAGES) -> list[str]:
    """The declared checks of ``stages`` (inputs exist, fields agree) before anything expensive starts;
    returns the problems."""
    problems: list[str] = []
    for name in stages:
        check = registry.stage(name).check_function()
        if check is not None:
            problems += check(cfg)
    if cfg.run.root.startswith("s3://") and not cfg.run.s3.endpoint_url:
        log.info("run.root is on S3 with the default AWS endpoint")
    return problems + half_done_conflicts(cfg, stages)


def half_done_conflicts(cfg: GrlmConfig, stages: tuple[str, ...]) -> list[str]:
    """A stage that stopped half-way (a killed job, an interrupted training) would be cleared and started over
    if the config it resumes under differs where that stage or one it reads looks: a resubmitted job with an
    edited config loses its checkpoints without a word. Refused instead, naming the changed fields; the user
    resubmits the config it ran with, or says to start over (``run.resume=false``) or picks a new ``run.name``.
    Finished stages are not affected: a changed config re-runs them, as always."""
    if not cfg.run.resume:
        return []
    run = Run.of(cfg)
    problems: list[str] = []
    for name in stages:
        manifest = read_manifest(run.store, run.name, name)
        if not manifest or manifest.get("status") != "running":  # complete, or marked for a redo (--redo)
            continue
        changed = []
        for s in upstream(name, cfg):
            m = manifest if s == name else read_manifest(run.store, run.name, s)
            if m is not None and not str(m.get("config_hash", "")).startswith(registry.stage_key(cfg, s)):
                changed.append(s)
        if changed:
            sections = sorted({sec for s in changed for sec in registry.key_sections(cfg, s)})
            recorded: dict[str, Any] = {}  # what those stages ran with, as their manifests recorded it
            for s in changed:
                m = manifest if s == name else read_manifest(run.store, run.name, s)
                recorded.update((m or {}).get("config") or {})
            fields = _changed_fields(run, cfg, sections, recorded if set(sections) <= set(recorded) else None)
            problems.append(
                f"run {run.name!r}: stage {name!r} stopped half-way and would be started over, because the "
                f"config differs from the one it ran with for {', '.join(changed)} "
                f"({'; '.join(fields) if fields else _no_field_differs(sections)}). Resubmit with the "
                f"config it ran with to resume it, or start that stage over with `grlm "
                f"{registry.stage(name).verb} CONFIG --redo` (the finished stages before it are kept), or set "
                f"run.resume=false to start every stage over, or use another run.name")
    return problems


def finished_redos(cfg: GrlmConfig, stages: tuple[str, ...]) -> list[str]:
    """The finished stages of ``stages`` that this config will do again, each with the fields that differ from
    the run's saved config.yaml: a redo is what a changed config means, but one nobody meant (the same data
    folder written another way, ``../data`` for ``/abs/data``) should be seen before an hour of training
    starts, not after. Only the first stage of a chain is named (the ones after it follow)."""
    if not cfg.run.resume:
        return []
    run = Run.of(cfg)
    for name in stages:
        manifest = read_manifest(run.store, run.name, name)
        if not manifest or manifest.get("status") != "complete":
            continue
        if str(manifest.get("config_hash", "")).startswith(registry.stage_key(cfg, name)):
            continue
        sections = list(registry.key_sections(cfg, name))
        fields = _changed_fields(run, cfg, sections)
        return [(f"run {run.name!r}: stage {name!r} is complete for another config and will be done again, and "
                 f"every stage after it ({'; '.join(fields) if fields else _no_field_differs(sections)})")]
    return []


def _no_field_differs(sections: list[str]) -> str:
    return (f"sections {', '.join(sections)}; no field differs from the run's saved config.yaml: a setting "
            "resolved on the machine differs (train.precision=auto: bf16 where the CPU / GPU has it natively, fp32 "
            "elsewhere), or another grlm-ray version keys the stage differently")


def _changed_fields(run: Run, cfg: GrlmConfig, sections: list[str],
                    recorded: dict[str, Any] | None = None) -> list[str]:
    """``a.b.c: old -> new`` for the fields of ``sections`` that differ from ``recorded`` (the sections the stages
    ran with, from their manifests), else from the run's saved config.yaml (written by the last pipeline run, which
    may be a later one; empty when it is missing or unreadable)."""
    import yaml

    rel = run.file("config.yaml")
    old: Any = recorded
    try:
        if old is None:
            old = yaml.safe_load(run.store.read_bytes(rel)) if run.store.exists(rel) else None
    except Exception as e:  # noqa: BLE001 - the fields are a courtesy: the refusal stands without them
        log.info("could not read %s to name the changed fields: %s", rel, e)
        old = None
    if not isinstance(old, dict):
        return []
    # compared as the stages run: train.precision=auto resolved on both sides (the train stage's keyed config: a
    # manifest records the resolved value, the saved config.yaml may hold "auto"), so only the fields a user
    # changed are named
    new = cfg.model_dump(mode="json")
    precision = registry.stage("train").keyed_config(cfg).train.precision
    new["train"]["precision"] = precision
    old_train = old.get("train")
    if isinstance(old_train, dict) and old_train.get("precision") == "auto":
        old = {**old, "train": {**old_train, "precision": precision}}

    def flat(d: Any, prefix: str) -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
            return out
        return {prefix: d}

    a = {k: v for sec in sections for k, v in flat(old.get(sec), sec).items()}
    b = {k: v for sec in sections for k, v in flat(new.get(sec), sec).items()}
    missing = "(unset)"
    return [f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}" for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


def save_resolved_config(cfg: GrlmConfig) -> str:
    run = Run.of(cfg)
    rel = run.file("config.yaml")
    run.store.write_bytes(rel, cfg.to_yaml().encode())
    return run.store.uri(rel)


def run_pipeline(cfg: GrlmConfig, *, stages: tuple[str, ...] = DEMO_STAGES) -> dict[str, Any]:
    """Run the named stages in order; finished stages are skipped, half-done ones resume. The members stage
    runs only where ``train.members`` > 1 (one model has no other members to train)."""
    stages = tuple(s for s in stages if s != "members" or cfg.train.members > 1)
    problems = check_inputs(cfg, stages)
    if problems:
        raise ConfigError("config checks failed:\n  " + "\n  ".join(problems))
    for line in finished_redos(cfg, stages):  # said before the saved config.yaml is replaced
        log.warning(line)
    t0 = time.time()
    results: dict[str, Any] = {"config": save_resolved_config(cfg), "stages": {}}
    for name in stages:
        log.info("stage %s (%s)", name, registry.stage(name).help)
        manifest = registry.stage(name).function()(cfg)
        results["stages"][name] = manifest
        manifest["mlflow_run_id"] = log_stage(cfg, name, manifest, texts=_stage_texts(cfg, name, manifest))
    if "prepare" in stages:
        results["stats"] = dataset_stats(Run.of(cfg).uri("prepare"), cfg.run.s3)
    results["seconds"] = round(time.time() - t0, 2)
    return results


def _stage_texts(cfg: GrlmConfig, stage: str, manifest: dict[str, Any]) -> dict[str, str]:
    """Extra artifacts for a stage's MLflow run (the DeepSpeed JSON, the exported model's manifest)."""
    if stage != "train" or manifest.get("skipped"):
        return {}
    import json

    run = Run.of(cfg)
    out = {}
    for output, name in (("deepspeed.json", "deepspeed.json"), ("model/grlm_model.json", "grlm_model.json")):
        if run.exists("train", output):
            out[name] = json.dumps(run.read_json("train", output), indent=2)
    return out


def format_summary(results: dict[str, Any]) -> str:
    lines = ["", "=== grlm run summary ===", f"config   {results['config']}"]
    for stage, m in results["stages"].items():
        state = "skipped (already complete)" if m.get("skipped") else f"done in {m.get('seconds', 0):.1f}s"
        outs = ", ".join(f"{k.removesuffix('.parquet')}={v:,}" for k, v in m.get("outputs", {}).items())
        lines.append(f"{stage:9s} {state}; {outs}")
        info = m.get("info", {})
        if info.get("rejects"):
            lines.append("          rejects: " + ", ".join(f"{k} x{v}" for k, v in info["rejects"].items()))
        if stage == "neighbors" and info.get("recall_at_k") is not None:
            lines.append(f"          {info['index']} (nlist {info['nlist']:,}, nprobe {info['nprobe']}): recall@{info['k']} "
                         f"{info['recall_at_k']:.3f} against exact search on {info['recall_sample']:,} sampled items")
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
        if stage == "members" and "members" in info:
            for r in info["members"]:
                lines.append(f"          member {r['member']}: run {r['run']} (seeds {r['model_seed']} / {r['train_seed']}), "
                             f"{'reused' if r['reused'] else 'trained'}, {r['stage_seconds'] or 0:.0f} s; model: {r['model']}")
        if stage == "eval" and "metrics" in info:
            lines += format_metrics(info)
        if stage == "baseline" and "metrics" in info:
            m, p = info["metrics"], info["popularity"]
            lines.append(f"          {info['protocol']['model']}: R@10 {m['recall_at_10']:.4f} N@10 {m['ndcg_at_10']:.4f} "
                         f"vs popularity R@10 {p['recall_at_10']:.4f} N@10 {p['ndcg_at_10']:.4f} "
                         f"({m['users']} users; loss {info['loss_first']} -> {info['loss_last']}, "
                         f"train {info['train_seconds']}s)")
    if "stats" in results:
        lines.append(format_stats(results["stats"], compact=True))
    lines.append(f"\ntotal {results['seconds']:.1f}s")
    return "\n".join(lines)
