"""`grlm status CONFIG`: where a run stands, from its store alone (a local folder or S3): each stage's state, whether
a finished stage still matches the config (else the next run redoes it), and how far an unfinished one got (the
stage's own ``progress`` hook: a training's newest checkpoint, its planned total, its validation points). Works
while a job runs, after it was stopped, and from any machine that sees the store."""

from __future__ import annotations

import time
from typing import Any

from grlm_ray.core import registry
from grlm_ray.core.config import GrlmConfig
from grlm_ray.core.registry import STAGES
from grlm_ray.core.run import Run
from grlm_ray.core.storage import read_manifest


def run_status(cfg: GrlmConfig) -> list[dict[str, Any]]:
    """One row per stage of the registry: ``stage``, ``state`` (complete / stale / unfinished / redo / not run) and
    what the manifest or the stage's progress hook knows."""
    run = Run.of(cfg)
    rows = []
    for name in STAGES:
        if name == "members" and cfg.train.members == 1:  # one model: nothing to train beside it
            continue
        m = read_manifest(run.store, run.name, name)
        row: dict[str, Any] = {"stage": name}
        if m is None:
            row["state"] = "not run"
        elif m.get("status") == "complete":
            same = str(m.get("config_hash", "")).startswith(registry.stage_key(cfg, name))
            row.update(state="complete" if same else "stale", seconds=m.get("seconds"), finished=_when(m.get("finished_at")))
        elif m.get("status") == "running":
            row.update(state="unfinished", started=_when(m.get("started_at")))
            hook = registry.stage(name).progress_function()
            if hook is not None:
                row.update(hook(cfg))
        else:
            row["state"] = str(m.get("status"))
        rows.append(row)
    return rows


def _when(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))


def format_status(cfg: GrlmConfig, rows: list[dict[str, Any]]) -> str:
    run = Run.of(cfg)
    lines = [f"run {run.name} in {cfg.run.root}"]
    for r in rows:
        s = r["state"]
        if s in ("complete", "stale"):
            text = f"{s}, {r.get('seconds') or 0:.0f} s, finished {r.get('finished')}"
            if s == "stale":
                text += " (the config differs where this stage looks: the next run redoes it)"
        elif s == "unfinished":
            text = f"started {r.get('started')}, not finished (running now, or stopped half-way: the next run resumes it)"
            if r.get("checkpoint_step") is not None:
                total = r.get("total_steps")
                text += (f"; checkpoint at step {r['checkpoint_step']:,}" + (f" of {total:,}" if total else "")
                         + f", {r.get('train_minutes', 0):.1f} training minutes")
            elif "checkpoint" in r:
                text += "; no checkpoint yet"
            if r.get("last_validation"):
                v, b = r["last_validation"], r.get("best_validation") or {}
                text += (f"; validation at step {v['step']:,}: R@10 {v['recall_at_10']:.4f} N@10 {v['ndcg_at_10']:.4f}"
                         + (f" (best {b['value']:.4f} at step {b['step']:,})" if b.get("value") is not None else ""))
        else:
            text = s
        lines.append(f"  {r['stage']:10s} {text}")
    return "\n".join(lines)
