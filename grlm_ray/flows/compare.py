"""Compression-settings comparison: IIFT + evaluation for every K of ``compress.ks`` and for the raw terms.

Contract: a config (with ``compress.ks``) -> for each variant a run ``<run>-raw`` / ``<run>-k<K>`` (its own
sft/train/eval, upstream stages copied from the base run, never recomputed) -> ``<run>/compare/
{comparison.json, comparison.csv, comparison.png}`` and one MLflow run (``grlm.stage=compare``) holding
the table and the plot (Recall/NDCG@10 and vocabulary size vs K). ``grlm compare EXPERIMENT`` prints the
latest table of an experiment from MLflow.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from typing import Any

from grlm_ray.core.config import GrlmConfig
from grlm_ray.core.errors import ConfigError
from grlm_ray.flows.pipeline import run_pipeline, upstream
from grlm_ray.core.run import Run
from grlm_ray.core.storage import copy_stages
from grlm_ray.core.tracking import log_bytes, metric_key, open_run, run_name

log = logging.getLogger(__name__)
COLUMNS = ("variant", "k", "vocab", "params", "colliding_items_mapped", "colliding_items_after", "train_loss_last",
           "recall_at_5", "ndcg_at_5", "recall_at_10", "ndcg_at_10", "vr_at_10", "dhr_at_10", "users",
           "train_seconds", "train_minutes", "eval_seconds")


def variant_name(cfg: GrlmConfig, k: int | None) -> str:
    """``raw``, ``k<K>``, ``k<K>-lead`` (``compress.keep_lead``), ``k<K>-random`` / ``k<K>-behaviour``
    (``compress.grouping``; ``-text<c>``: ``compress.behaviour_text``), ``k<K>-rare<N>`` (``compress.keep_rare``): the
    variant's row and its run's suffix."""
    if k is None:
        return "raw"
    c = cfg.compress
    text = f"-text{c.behaviour_text:g}" if c.grouping == "behaviour" and c.behaviour_text else ""
    return (f"k{k}{'-lead' if c.keep_lead else ''}{'' if c.grouping == 'semantic' else f'-{c.grouping}'}{text}"
            f"{f'-rare{c.keep_rare}' if c.keep_rare else ''}")


def variant_config(cfg: GrlmConfig, k: int | None) -> GrlmConfig:
    """The config of one variant: its own run name, the compressed (or raw) terms for IIFT. A K variant
    compresses for its own K only (``compress.ks=[K]``, seconds), so its key — and its training's — does not
    change when the comparison's other settings do: adding a K later trains only the new one."""
    data = cfg.model_dump(mode="json")
    data["run"]["name"] = f"{cfg.run.name}-{variant_name(cfg, k)}"
    data["sft"]["terms"] = cfg.compress.source if k is None else "compress"
    data["sft"]["compress_k"] = k
    if k is not None:
        data["compress"]["ks"] = [k]
    return GrlmConfig.model_validate(data)


def compression_comparison(cfg: GrlmConfig) -> dict[str, Any]:
    if not cfg.compress.ks:
        raise ConfigError("compress.ks is empty: nothing to compare")
    t0 = time.time()
    # the base run does what every variant's compress reads, not the compress itself: each K variant compresses
    # for its own K (and reports the raw terms' row too), so comparisons with other compress settings (ks,
    # keep_lead) never redo the base run's compress stage — the one its own training used
    run_pipeline(cfg, stages=tuple(s for s in upstream("compress", cfg) if s != "compress"))
    sweep: dict[str, dict[str, Any]] = {}
    run = Run.of(cfg)
    store = run.store
    done: dict[int | None, tuple[GrlmConfig, dict[str, Any]]] = {}
    for k in [*sorted(set(cfg.compress.ks)), None]:  # the K variants first: their sweeps give the raw row too
        vcfg = variant_config(cfg, k)
        # the raw variant trains on the base run's own terms: whatever the base run finished (its training, its
        # evaluation) is shared too, and reused where its key is the variant's (a joint run trained by hand is
        # the comparison's raw row, not trained twice)
        # (a K variant: what its compress stage reads, not the base run's compress — its sweep is over every K,
        # the variant's over its own: copying it over would redo the variant's compress on every comparison and
        # refuse to resume a variant's half-done evaluation)
        shared = tuple(s for s in upstream("compress", cfg) if s != "compress") if k is not None \
            else upstream("eval", vcfg)
        copy_stages(store, cfg.run.name, vcfg.run.name, shared)
        log.info("comparison: variant %s (run %s)", "raw" if k is None else f"K={k}", vcfg.run.name)
        res = run_pipeline(vcfg, stages=upstream("eval", vcfg))["stages"]
        if k is not None:
            sweep.update({str(r["k"]): r for r in res["compress"]["info"]["sweep"]})
        done[k] = (vcfg, res)
    rows = []
    for k in [None, *sorted(set(cfg.compress.ks))]:
        vcfg, res = done[k]
        m, tr = res["eval"]["info"]["metrics"], res["train"]["info"]
        s = sweep["raw" if k is None else str(k)]
        per_domain = res["eval"]["info"].get("per_domain") or {}
        rows.append({"variant": variant_name(cfg, k), "k": k, "vocab": s["vocab"],
                     "colliding_items_mapped": s["colliding_items_mapped"],
                     "colliding_items_after": s.get("colliding_items_after"),
                     "train_loss_last": tr.get("final_loss"), "users": m["users"],
                     # the model's size: a from-scratch model's term embeddings are most of it, so compressing the
                     # vocabulary shrinks the model too (what a same-size comparison has to widen back)
                     "params": (tr.get("backbone") or {}).get("parameters"),
                     **{c: m.get(c) for c in COLUMNS if c.startswith(("recall", "ndcg", "vr", "dhr"))},
                     "train_seconds": res["train"].get("seconds"), "eval_seconds": res["eval"].get("seconds"),
                     # the training loop's own clock (validation excluded), what a budget compares
                     "train_minutes": Run.of(vcfg).training_cost()["minutes"],
                     **({"per_domain": {d: {key: v.get(key) for key in ("recall_at_10", "ndcg_at_10", "users")}
                                        for d, v in per_domain.items()}} if len(per_domain) > 1 else {})})
    out = {"experiment": cfg.tracking.experiment, "run": cfg.run.name, "source": cfg.compress.source,
           "rows": rows, "protocol": res["eval"]["info"]["protocol"], "seconds": round(time.time() - t0, 1)}
    store.write_json(run.file("compare/comparison.json"), out)
    store.write_bytes(run.file("compare/comparison.csv"), to_csv(rows).encode())
    png = plot(rows)
    store.write_bytes(run.file("compare/comparison.png"), png)
    out["mlflow_run_id"] = _log(cfg, out, png)
    return out


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def format_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a console table: vocabulary, items colliding after compression (before / after
    re-resolution), the metrics, the model's parameters (millions), training minutes; a joint catalog adds R@10 /
    N@10 per domain."""
    def f(x: Any, w: int = 7, p: int = 4) -> str:
        return f"{x:{w}.{p}f}" if isinstance(x, (int, float)) else f"{'-':>{w}s}"

    def n(x: Any, w: int) -> str:
        return f"{x:{w}d}" if isinstance(x, int) else f"{'-':>{w}s}"

    w = max([8, *(len(r["variant"]) for r in rows)])  # k1100-random-rare1 and the like stay aligned
    head = (f"{'variant':>{w}s} {'vocab':>6s} {'collide':>8s} {'after':>6s} {'R@5':>7s} {'N@5':>7s} {'R@10':>7s} "
            f"{'N@10':>7s} {'VR@10':>6s} {'loss':>6s} {'params M':>8s} {'train min':>9s}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['variant']:>{w}s} {r['vocab']:6d} {n(r.get('colliding_items_mapped'), 8)} "
                     f"{n(r.get('colliding_items_after'), 6)} {f(r.get('recall_at_5'))} {f(r.get('ndcg_at_5'))} "
                     f"{f(r.get('recall_at_10'))} {f(r.get('ndcg_at_10'))} {f(r.get('vr_at_10'), 6, 3)} "
                     f"{f(r.get('train_loss_last'), 6, 3)} "
                     f"{f(r['params'] / 1e6 if isinstance(r.get('params'), int) else None, 8, 2)} "
                     f"{f(r.get('train_minutes'), 9, 1)}")
    domains = sorted({d for r in rows for d in (r.get("per_domain") or {})})
    if domains:
        lines.append("per domain, R@10 / N@10:")
        lines.append(f"{'variant':>{w}s} " + " ".join(f"{d[:17]:>17s}" for d in domains))
        for r in rows:
            pd_ = r.get("per_domain") or {}
            cells = [f"{f(pd_[d].get('recall_at_10'), 8)}/{f(pd_[d].get('ndcg_at_10'), 8)}" if d in pd_ else f"{'-':>17s}"
                     for d in domains]
            lines.append(f"{r['variant']:>{w}s} " + " ".join(cells))
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r for r in rows if r["k"] is not None]
    raw = next((r for r in rows if r["k"] is None), None)
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    for key, style, label in (("recall_at_10", "o-", "Recall@10"), ("ndcg_at_10", "s-", "NDCG@10")):
        line, = ax.plot([r["k"] for r in ks], [r.get(key) or 0 for r in ks], style, label=label)
        if raw is not None:
            ax.axhline(raw.get(key) or 0, ls="--", c=line.get_color(), lw=1, label=f"{label} raw")
    ax.set_xlabel("K (core terms)")
    ax.set_ylabel("metric")
    ax2 = ax.twinx()
    ax2.plot([r["k"] for r in ks], [r["vocab"] for r in ks], "^:", c="gray", label="vocabulary")
    ax2.set_ylabel("distinct terms")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.legend(loc="lower center", ncol=3, fontsize=7)  # below the axes: it hides no point
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def _log(cfg: GrlmConfig, out: dict[str, Any], png: bytes) -> str | None:
    if not cfg.tracking.enabled:
        return None
    import mlflow

    with open_run(cfg, "compare", run_name(cfg, f"compare-ks{'-'.join(map(str, sorted(set(cfg.compress.ks))))}")) as run:
        mlflow.log_params({"compress/ks": str(sorted(set(cfg.compress.ks))), "compress/source": cfg.compress.source})
        for r in out["rows"]:
            for key in ("recall_at_10", "ndcg_at_10", "vocab", "params", "colliding_items_mapped",
                        "colliding_items_after", "train_minutes"):
                if isinstance(r.get(key), (int, float)):
                    mlflow.log_metric(metric_key(f"{r['variant']}/{key}"), float(r[key]))
            for dom, v in (r.get("per_domain") or {}).items():
                for key in ("recall_at_10", "ndcg_at_10"):
                    if isinstance(v.get(key), (int, float)):
                        mlflow.log_metric(metric_key(f"{r['variant']}/{dom}/{key}"), float(v[key]))
        mlflow.log_dict(out, "comparison.json")
        mlflow.log_text(to_csv(out["rows"]), "comparison.csv")
        log_bytes(png, "comparison.png")
        return run.info.run_id


def table_from_mlflow(experiment: str, tracking: str | None = None) -> tuple[dict[str, Any], str]:
    """The latest comparison of an experiment, read back from MLflow: (comparison, run id)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking:
        mlflow.set_tracking_uri(tracking)
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment named {experiment!r} at {mlflow.get_tracking_uri()}")
    runs = client.search_runs([exp.experiment_id], "tags.`grlm.stage` = 'compare'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ConfigError(f"experiment {experiment!r} has no compression comparison (run `grlm compression-comparison`)")
    run_id = runs[0].info.run_id
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/comparison.json"), run_id
