"""Quality benchmark: GRLM vs SASRec vs popularity on the same test users, with ablations.

Contract: a config (``bench`` section) -> runs that share upstream work -> one table (printed) and
``<bench.out_dir>/quality_<run>_<mode>.json`` (+ the machine description).

    <run>                       prepare, sft, train        GRLM (the config as given)
    <run>-<mode>                eval, baseline             constrained decoding; SASRec (baseline.loss=ce)
    <run>-<mode>-unconstrained  eval                       ablation: no token trie (same model)
    <run>-nogti                 sft, train                 ablation no_gti: sft.gti_weight=0 (no term internalization)
    <run>-nogti-<mode>          eval
    <run>-gti / <run>-gti-<mode>  (same)                   ablation with_gti: sft.gti_weight=1 (for a config without GTI)
    <run>-<mode>-sasrec-sampled baseline                   SASRec with sampled softmax (eSASRec's loss)
    <run>-<mode>-sasrec-bce     baseline                   SASRec with one sampled negative (the paper's)
    <run>-valid                 eval                       bench.content_fills: validation users, to choose
    <run>-<mode>-content        eval                       GRLM + the chosen eval.content_fill (text neighbours)

Variants get the stages they share copied (``storage.copy_stages``), so nothing is computed twice, and
every stage resumes. ``sample`` mode scores a seeded sample of ``bench.sample_users`` test users
(``eval.seed``), ``full`` mode every test user; the table is refused unless every model's predictions
cover exactly the same users, and the sample (size, seed, a digest of the user ids) is saved with it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from grlm_ray.bench.common import figure_png
from grlm_ray.core.config import GrlmConfig
from grlm_ray.core.errors import GrlmError
from grlm_ray.core.run import Run
from grlm_ray.core.storage import copy_stages

log = logging.getLogger(__name__)

METRICS = ("recall_at_5", "ndcg_at_5", "recall_at_10", "ndcg_at_10", "vr_at_10", "dhr_at_10")
COLUMNS = ("model", *METRICS, "distinct_top1", "coverage_at_10", "train_s", "eval_s", "users")


def _variant(cfg: GrlmConfig, name: str, **sections: dict[str, Any]) -> GrlmConfig:
    data = cfg.model_dump(mode="json")
    data["run"]["name"] = name
    for section, values in sections.items():
        data[section].update(values)
    return GrlmConfig.model_validate(data)


def plan(cfg: GrlmConfig) -> dict[str, GrlmConfig]:
    """Every run of the benchmark, by role, with its config."""
    b, run = cfg.bench, cfg.run.name
    limit = {"limit_users": b.sample_users if b.mode == "sample" else None}
    out = {"train": cfg, "eval": _variant(cfg, f"{run}-{b.mode}", eval=limit, baseline={"loss": "ce"})}
    if "unconstrained" in b.ablations:
        out["eval_unconstrained"] = _variant(cfg, f"{run}-{b.mode}-unconstrained", eval={**limit, "constrained": False})
    if "no_gti" in b.ablations:
        if cfg.sft.gti_weight == 0:
            raise GrlmError("bench.ablations has no_gti but the config trains without GTI (sft.gti_weight=0): "
                            "use the with_gti ablation")
        out["train_gti"] = _variant(cfg, f"{run}-nogti", sft={"gti_weight": 0.0})
        out["eval_gti"] = _variant(cfg, f"{run}-nogti-{b.mode}", eval=limit, sft={"gti_weight": 0.0})
    elif "with_gti" in b.ablations:
        if cfg.sft.gti_weight > 0:
            raise GrlmError("bench.ablations has with_gti but the config already trains with GTI: use no_gti")
        out["train_gti"] = _variant(cfg, f"{run}-gti", sft={"gti_weight": 1.0})
        out["eval_gti"] = _variant(cfg, f"{run}-gti-{b.mode}", eval=limit, sft={"gti_weight": 1.0})
    if b.content_fills:  # eval.content_fill: chosen on validation users, then one test evaluation with it
        out["eval_valid"] = _variant(cfg, f"{run}-valid", eval={"split": "valid", "limit_users": b.sample_users})
        out["eval_content"] = _variant(cfg, f"{run}-{b.mode}-content", eval=limit)  # content_fill set on choosing
    for loss in ("sampled", "bce"):
        if f"sasrec_{loss}" in b.baselines:
            out[f"baseline_{loss}"] = _variant(cfg, f"{run}-{b.mode}-sasrec-{loss}", eval=limit, baseline={"loss": loss})
    return out


def _row(model: str, metrics: dict[str, Any], train_s: float | None, eval_s: float | None) -> dict[str, Any]:
    return {"model": model, **{m: metrics.get(m) for m in METRICS}, "train_s": train_s, "eval_s": eval_s,
            "users": metrics.get("users")}


def _train_seconds(stages: dict[str, Any]) -> float:
    """Training seconds of a row's model: the train stage's, plus every other member's (``train.members``)."""
    members = stages.get("members", {}).get("info", {}).get("members", [])
    return round(stages["train"]["seconds"] + sum(m["stage_seconds"] or 0.0 for m in members), 2)


def _predictions(run: Run, stage: str) -> tuple[list[str], list[list[str]]]:
    """(user ids, ranked item ids) of a stage's predictions, in row order."""
    from grlm_ray.core.schemas import PREDICTIONS

    t = run.read_table(stage, "predictions.parquet", PREDICTIONS)
    return t.column("user_id").to_pylist(), t.column("ranked_item_ids").to_pylist()


def choose_content_fill(cfg: GrlmConfig, fills: list[int]) -> dict[str, Any]:
    """``eval.content_fill`` chosen on the validation users ``cfg``'s eval stage scored: its lists refilled from
    the catalog's text neighbours of each user's last item for each of ``fills`` and 0 (``cold_start.fill_points``
    at ``eval.content_depth``). Nothing is decoded again: the refill is what the eval stage does after decoding."""
    from grlm_ray.bench.cold_start import fill_points, validation_lists
    from grlm_ray.lib.eig import TextNeighbours
    from grlm_ray.lib.embeddings import catalog_embeddings

    _, rows, last = validation_lists(cfg)
    ids, emb = catalog_embeddings(cfg, [])
    depth = cfg.eval.content_depth
    return {**fill_points(rows, TextNeighbours(ids, emb, ids).ranked(last, depth), fills, set(), depth),
            "depth": depth}


def diversity(ranked: list[list[str]], catalog: int, k: int = 10) -> dict[str, Any]:
    """How much of the catalog a model recommends: distinct items at rank 1 and in the top k, and the
    top-k catalog coverage. A model that ignores the history recommends the same few items to everyone."""
    top_k = {i for r in ranked for i in r[:k]}
    return {"distinct_top1": len({r[0] for r in ranked if r}), f"coverage_at_{k}": round(len(top_k) / catalog, 4)}


def quality(cfg: GrlmConfig) -> dict[str, Any]:
    from grlm_ray.flows.pipeline import run_pipeline, upstream

    t0 = time.time()
    runs = plan(cfg)
    run = Run.of(cfg)
    store = run.store
    stages: dict[str, dict[str, Any]] = {}

    def go(role: str, stage: str, seed_from: str | None = None, shared: tuple[str, ...] | None = None
           ) -> dict[str, Any]:
        """Run ``role`` up to ``stage``, first copying the finished stages it shares with ``seed_from``
        (default: everything the eval stage reads: the trained model and its train.members)."""
        c = runs[role]
        if seed_from is not None:
            copy_stages(store, runs[seed_from].run.name, c.run.name, shared or upstream("eval", c)[:-1])
        log.info("quality benchmark: %s (run %s, stage %s)", role, c.run.name, stage)
        res = run_pipeline(c, stages=upstream(stage, c))["stages"]
        stages[role] = res
        return res

    n_members = cfg.train.members  # > 1: the members are trained here, once, and copied into every variant
    last = "members" if n_members > 1 else "train"
    base = go("train", last)
    train = base["train"]
    members = base["members"]["info"]["members"] if n_members > 1 else []
    train_s = _train_seconds(base)
    grlm = "GRLM" if n_members == 1 else f"GRLM, {n_members} seeds as one"
    sft_info = base["sft"]["info"]
    ev = go("eval", "eval", seed_from="train")["eval"]
    rows = [_row(grlm, ev["info"]["metrics"], train_s, ev["seconds"])]
    used = {grlm: ("eval", "eval")}
    if "eval_unconstrained" in runs:
        un = go("eval_unconstrained", "eval", seed_from="train")["eval"]
        rows.append(_row(f"{grlm} unconstrained", un["info"]["metrics"], train_s, un["seconds"]))
        used[f"{grlm} unconstrained"] = ("eval_unconstrained", "eval")
    gti_name = "GRLM w/o GTI" if cfg.sft.gti_weight > 0 else "GRLM with GTI"
    if "train_gti" in runs:
        # its own SFT data and training: only the stages before SFT are shared (copying the rest is waste)
        tn = go("train_gti", last, seed_from="train", shared=upstream("sft", runs["train_gti"])[:-1])
        en = go("eval_gti", "eval", seed_from="train_gti")["eval"]
        rows.append(_row(gti_name, en["info"]["metrics"], _train_seconds(tn), en["seconds"]))
        used[gti_name] = ("eval_gti", "eval")
    content = None
    if "eval_valid" in runs:
        go("eval_valid", "eval", seed_from="train")
        content = choose_content_fill(runs["eval_valid"], cfg.bench.content_fills)
        log.info("quality benchmark: eval.content_fill=%d chosen on %d validation users", content["chosen"],
                 content["users"])
        if content["chosen"]:
            runs["eval_content"] = _variant(runs["eval_content"], runs["eval_content"].run.name,
                                            eval={"content_fill": content["chosen"]})
            ec = go("eval_content", "eval", seed_from="train")["eval"]
            name = f"{grlm} + {content['chosen']} text neighbours"
            # its beams are the GRLM row's (reused, not decoded again): its cost is theirs plus the refill
            reused = ec["info"].get("decoded_reused", {}).get("seconds", 0.0)
            rows.append(_row(name, ec["info"]["metrics"], train_s, round(ec["seconds"] + reused, 3)))
            used[name] = ("eval_content", "eval")
        else:
            del runs["eval_content"]
    blocks = " (LiGR blocks)" if cfg.baseline.layers == "ligr" else ""  # eSASRec's layers (baseline.layers)
    for role, name in (("eval", f"SASRec-CE{blocks}"), ("baseline_sampled", f"SASRec-SS{blocks}"),
                       ("baseline_bce", f"SASRec-BCE{blocks}")):
        if role == "eval" and "sasrec_ce" not in cfg.bench.baselines or role not in runs:
            continue
        c = runs[role]
        copy_stages(store, runs["train"].run.name, c.run.name, ("prepare",))
        bl = run_pipeline(c, stages=("prepare", "baseline"))["stages"]["baseline"]
        rows.append(_row(name, bl["info"]["metrics"], bl["info"]["train_seconds"], bl["info"]["eval_seconds"]))
        used[name] = (role, "baseline")
        stages.setdefault(f"{role}_baseline", {})["baseline"] = bl
    rows.append(_row("popularity", ev["info"]["popularity"], None, None))

    # same users for every model, or no table
    reference, _ = _predictions(run.named(runs["eval"].run.name), "eval")
    catalog = base["sft"]["outputs"].get("terms.parquet") or len(reference)
    by_model = {r["model"]: r for r in rows}
    for name, (role, stage) in used.items():
        users, ranked = _predictions(run.named(runs[role].run.name), stage)
        if users != reference:
            raise GrlmError(f"quality benchmark: {name} ({run.named(runs[role].run.name).uri(stage)}) was scored on "
                            f"other test users than GRLM ({run.named(runs['eval'].run.name).uri('eval')})")
        by_model[name].update(diversity(ranked, catalog))
    by_model["popularity"].update({"distinct_top1": 1, "coverage_at_10": round(min(10, catalog) / catalog, 4)})
    sample = {"mode": cfg.bench.mode, "users": len(reference), "limit": runs["eval"].eval.limit_users,
              "seed": cfg.eval.seed, "split": cfg.eval.split,
              "user_ids_sha1": hashlib.sha1("\n".join(sorted(reference)).encode()).hexdigest()}
    out = {"run": cfg.run.name, "mode": cfg.bench.mode, "sample": sample, "rows": rows,
            "columns": list(COLUMNS), "runs": {role: c.run.name for role, c in runs.items()},
            "protocol": ev["info"]["protocol"], "content_fill": content,
            "terms": {"source": cfg.sft.terms, "samples": sft_info.get("samples"),
                      "items_named_from_words": sft_info.get("items_named_from_words"),
                      "colliding_items_before": sft_info.get("collisions", {}).get("colliding_items_before"),
                      "colliding_items_after": sft_info.get("collisions", {}).get("colliding_items_after")},
            "training": {"grlm": {k: train["info"].get(k) for k in ("steps", "plan", "final_loss", "tokens_per_s",
                                                                   "samples_per_s", "train_seconds",
                                                                   "attempt_seconds", "resumed_from_step")},
                         "members": members,
                         "sasrec": {k: stages.get("eval_baseline", {}).get("baseline", {}).get("info", {}).get(k)
                                    for k in ("losses", "train_seconds", "best_epoch", "epochs_run")}},
            "model": cfg.model.model_dump(mode="json"), "train_config": cfg.train.model_dump(mode="json"),
            "baseline_config": cfg.baseline.model_dump(mode="json"), "seconds": round(time.time() - t0, 1)}
    curves = {"GRLM": (train["info"].get("validation") or {}).get("points")}
    if "train_gti" in stages:
        curves[gti_name] = (stages["train_gti"]["train"]["info"].get("validation") or {}).get("points")
    for name, (role, stage) in used.items():  # SASRec's own validation curves (baseline.validation.users)
        if stage == "baseline":
            curves[name] = stages[f"{role}_baseline"]["baseline"]["info"].get("validation_curve")
    out["validation_curves"] = {k: v for k, v in curves.items() if v}
    out["mlflow_run_id"] = _log(cfg, out)
    return out


CURVE_X = {"minutes": ("train_minutes", 1.0, "training wall-clock (min)"),
           "tokens": ("train_tokens", 1e6, "training tokens (millions, real, every worker's)")}


def plot_curves(curves: dict[str, list[dict[str, Any]]], title: str, x: str = "minutes",
                floors: dict[str, dict[str, Any]] | None = None) -> bytes:
    """Validation R@10 and N@10 of each trained model against training wall-clock or training tokens (``x``:
    a key of ``CURVE_X``): the learning curves; ``floors``: untrained references (e.g. popularity on the same
    users, its ``recall_at_10`` / ``ndcg_at_10``) as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, scale, xlabel = CURVE_X[x]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, points in curves.items():
        xs = [p[key] / scale for p in points]
        axes[0].plot(xs, [p["recall_at_10"] for p in points], "o-", label=name)
        axes[1].plot(xs, [p["ndcg_at_10"] for p in points], "o-", label=name)
    for name, floor in (floors or {}).items():
        axes[0].axhline(floor["recall_at_10"], color="gray", ls="--", lw=1, label=name)
        axes[1].axhline(floor["ndcg_at_10"], color="gray", ls="--", lw=1, label=name)
    for ax, label in zip(axes, ("validation R@10", "validation N@10")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return figure_png(fig, dpi=110)


def plot(rows: list[dict[str, Any]], title: str,
         keys: tuple[str, ...] = ("recall_at_5", "recall_at_10", "ndcg_at_5", "ndcg_at_10")) -> bytes:
    """``keys`` (default Recall/NDCG at 5 and 10) per model, one group of bars each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import textwrap

    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(rows)), 4.6))
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        ax.bar([i + j * width for i in range(len(rows))], [r.get(key) or 0 for r in rows], width, label=key)
    # long model names wrapped (and tilted when there are many): every label stays readable
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))],
                  [textwrap.fill(r["model"], 22) for r in rows], fontsize=7,
                  rotation=25 if len(rows) > 6 else 0, ha="right" if len(rows) > 6 else "center")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the axes: no bar hidden
    return figure_png(fig)


def _log(cfg: GrlmConfig, out: dict[str, Any]) -> str | None:
    """One MLflow run (grlm.stage=bench-quality) with every model's metrics, the table and the plot."""
    if not cfg.tracking.enabled:
        return None
    import mlflow

    from grlm_ray.core.tracking import log_bytes, metric_key, open_run, run_name

    with open_run(cfg, "bench-quality", run_name(cfg, f"bench-quality-{cfg.bench.mode}")) as r:
        mlflow.log_params({"bench/mode": cfg.bench.mode, "bench/users": out["sample"]["users"],
                           "bench/user_ids_sha1": out["sample"]["user_ids_sha1"]})
        for row in out["rows"]:
            for key in (*METRICS, "train_s", "eval_s"):
                if isinstance(row.get(key), (int, float)):
                    mlflow.log_metric(metric_key(f"{row['model']}/{key}".replace(" ", "_")), float(row[key]))
        mlflow.log_dict(out, "quality.json")
        log_bytes(plot(out["rows"], f"{cfg.run.name}, {out['sample']['users']} test users ({cfg.bench.mode})"), "quality.png")
        return r.info.run_id


def add_args(ap: Any) -> None:
    ap.add_argument("args", nargs="*", metavar="CONFIG [key=value]",
                    help="e.g. configs/bench/beauty_quality.yaml bench.mode=full")
    ap.add_argument("--out-dir", default=None, help="default: the config's bench.out_dir")


def run(args: Any) -> dict[str, Any]:
    from grlm_ray.core.config import split_args
    from grlm_ray.core.config import load_config

    path, overrides = split_args(args.args, required=False)  # no CONFIG: the built-in defaults
    cfg = load_config(path, overrides)
    result = quality(cfg)
    result["config"] = path
    result["overrides"] = overrides
    result["command"] = " ".join(["grlm bench quality", *args.args])
    from grlm_ray.bench.common import DEFAULT_OUT

    result["out_dir"] = args.out_dir or cfg.bench.out_dir or DEFAULT_OUT
    result["file_name"] = f"quality_{cfg.run.name}_{cfg.bench.mode}"
    png = Path(result["out_dir"]) / f"{result['file_name']}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(plot(result["rows"], f"{cfg.run.name}: {result['sample']['users']} test users ({cfg.bench.mode})"))
    result["plot"] = str(png)
    if result.get("validation_curves"):
        curves_png = Path(result["out_dir"]) / f"{result['file_name']}_curves.png"
        curves_png.write_bytes(plot_curves(result["validation_curves"], f"{cfg.run.name}: learning curves "
                                           "(validation users, never test)"))
        result["curves_plot"] = str(curves_png)
    return result
