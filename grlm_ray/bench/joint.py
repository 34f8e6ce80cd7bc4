"""One joint model vs one model per domain, per domain on the same test users (``grlm bench joint``).

Contract: the joint run (a ``data.mode: joint`` config, trained and evaluated: ``grlm eval`` or the ``ray job
submit`` of it) and each domain's single-domain quality run in full mode (``grlm bench quality CONFIG
bench.mode=full``: the model in ``<run>/train``, its evaluation in ``<run>-full/eval``) -> one row per domain:
R@10 / N@10 of each, the joint/single ratio, the share of the joint model's top 10 from another domain
(counted, never hidden), users; and the training minutes of the joint model vs the sum of the single ones.
The table is refused unless each domain's test users are exactly the same in both (user ids compared with the
joint namespace taken off). Nothing is trained here: a missing run is named with the command that makes it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from grlm_ray.bench.common import figure_png
from grlm_ray.core.errors import GrlmError

METRICS = ("recall_at_10", "ndcg_at_10")
CLOCK = ("the training loop's clock: training steps only (validation excluded), carried across the attempts of a "
         "run that was stopped and resumed; cores possibly shared with other work (see each run's notes)")


def _manifest(run: Any, stage: str, how: str) -> dict[str, Any]:
    from grlm_ray.core.storage import read_manifest

    m = read_manifest(run.store, run.name, stage)
    if not m or m.get("status") != "complete":
        raise GrlmError(f"run {run.name!r} has no finished {stage} stage under {run.root}: {how}")
    return m


def _users(run: Any, strip: str = "") -> tuple[int, str]:
    """(count, sha1 of the sorted user ids) of a run's test predictions; ``strip``: a namespace to take off."""
    import pyarrow.compute as pc

    t = run.read_table("eval", "predictions.parquet", columns=["user_id", "split"])
    users = t.filter(pc.equal(t.column("split"), "test")).column("user_id").to_pylist()
    if strip:
        users = [u[len(strip):] for u in users if u.startswith(strip)]
    ids = sorted(users)
    return len(ids), hashlib.sha1("\n".join(ids).encode()).hexdigest()


def joint_vs_single(joint_cfg: Any, singles: dict[str, Any]) -> dict[str, Any]:
    from grlm_ray.core.run import Run

    jrun = Run.of(joint_cfg)
    if joint_cfg.data.mode != "joint":
        raise GrlmError(f"the joint config has data.mode={joint_cfg.data.mode!r}, not 'joint'")
    missing = sorted(set(joint_cfg.data.domains) - set(singles))
    if missing:
        raise GrlmError(f"no single-domain config for domain(s) {missing} of the joint catalog "
                        f"({', '.join(joint_cfg.data.domains)})")
    j_eval = _manifest(jrun, "eval", f"grlm eval <the joint config> run.root={joint_cfg.run.root}")
    j_train = _manifest(jrun, "train", "grlm train <the joint config>")
    per_domain = j_eval["info"].get("per_domain") or {}
    rows, single_minutes, single_steps, sources = [], 0.0, 0, {}
    for dom, cfg in singles.items():
        if dom not in joint_cfg.data.domains:
            raise GrlmError(f"--single {dom}=...: {dom!r} is not a domain of the joint config")
        if isinstance(cfg, (str, Path)):  # a recorded full-mode quality result (the runs themselves not at hand)
            sm, cost, n_s, sha_s, sources[dom] = _recorded(dom, Path(cfg))
        else:
            srun = Run.of(cfg)
            how = f"grlm bench quality <{dom}'s config> bench.mode=full run.root={cfg.run.root}"
            s_eval = _manifest(srun.named(f"{cfg.run.name}-full"), "eval", how)
            _manifest(srun, "train", how)  # its training finished (else a clear error naming the command)
            n_s, sha_s = _users(srun.named(f"{cfg.run.name}-full"))
            sm, cost, sources[dom] = s_eval["info"]["metrics"], srun.training_cost(), cfg.run.name
        n_j, sha_j = _users(jrun, strip=f"{dom}/")
        if (n_s, sha_s) != (n_j, sha_j):
            raise GrlmError(f"domain {dom!r}: the single-domain run scored {n_s} test users, the joint run {n_j} "
                            f"of this domain, and they are not the same users: the comparison needs the same users")
        jm = per_domain.get(dom, {})
        single_minutes += cost["minutes"] or 0
        single_steps += cost["steps"] or 0
        rows.append({"domain": dom, "users": n_s,
                     "single_recall_at_10": sm.get("recall_at_10"), "single_ndcg_at_10": sm.get("ndcg_at_10"),
                     "joint_recall_at_10": jm.get("recall_at_10"), "joint_ndcg_at_10": jm.get("ndcg_at_10"),
                     "recall_ratio": _ratio(jm.get("recall_at_10"), sm.get("recall_at_10")),
                     "ndcg_ratio": _ratio(jm.get("ndcg_at_10"), sm.get("ndcg_at_10")),
                     "joint_other_domain_at_10": jm.get("cross_domain_at_10"),
                     "single_train_minutes": cost["minutes"], "single_steps": cost["steps"],
                     "users_sha1": sha_s[:12]})
    joint = jrun.training_cost()
    return {"rows": rows,
            "training": {"joint_minutes": joint["minutes"], "single_minutes_sum": round(single_minutes, 1),
                         "joint_over_sum": _ratio(joint["minutes"], single_minutes),
                         "joint_steps": joint["steps"], "single_steps_sum": single_steps,
                         "joint_steps_over_sum": _ratio(joint["steps"], single_steps),
                         "rows_per_step": j_train["info"].get("plan", {}).get("rows_per_step"),
                         "clock": CLOCK},
            "ratios": {f"{r['domain']}_recall_joint_over_single": r["recall_ratio"] for r in rows},
            "runs": {"joint": jrun.name, **sources}}


def _recorded(dom: str, path: Path) -> tuple[dict[str, Any], dict[str, Any], int, str, str]:
    """A domain's single model from a recorded ``grlm bench quality ... bench.mode=full`` result file (its GRLM
    row and the digest of the test users it scored): (metrics, training cost, users, users sha1, source)."""
    import json

    from grlm_ray.core.run import training_cost

    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise GrlmError(f"--single {dom}={path}: not a readable result file ({err})") from None
    sample = res.get("sample") if isinstance(res, dict) else None
    if not isinstance(sample, dict) or res.get("benchmark") != "quality" or sample.get("mode") != "full" \
            or sample.get("split") != "test":
        raise GrlmError(f"--single {dom}={path}: not a full-mode quality result on the test split (`grlm bench "
                        "quality CONFIG bench.mode=full` writes one): the comparison needs every test user")
    row = next((r for r in res.get("rows", []) if r.get("model") == "GRLM"), None)
    if row is None:
        raise GrlmError(f"--single {dom}={path}: no 'GRLM' row (rows: {[r.get('model') for r in res['rows']]})")
    metrics = {m: row.get(m) for m in METRICS}
    grlm = (res.get("training") or {}).get("grlm") or {}
    info = {"steps": grlm.get("steps"), "train_seconds": row.get("train_s")}
    if "attempt_seconds" in grlm:  # recorded with the loop's clock
        info.update(train_seconds=grlm.get("train_seconds"), attempt_seconds=grlm["attempt_seconds"])
    cost = training_cost(info, (res.get("validation_curves") or {}).get("GRLM") or [])
    return metrics, cost, int(sample["users"]), sample["user_ids_sha1"], \
        f"{path.name} ({res.get('time', 'time not recorded')}, run {res.get('runs', {}).get('train')})"


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def plot(rows: list[dict[str, Any]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    x = range(len(rows))
    for ax, metric, label in ((axes[0], "recall_at_10", "Recall@10"), (axes[1], "ndcg_at_10", "NDCG@10")):
        ax.bar([i - 0.2 for i in x], [r[f"single_{metric}"] or 0 for r in rows], 0.4, label="one model per domain")
        ax.bar([i + 0.2 for i in x], [r[f"joint_{metric}"] or 0 for r in rows], 0.4, label="one joint model")
        ax.set_xticks(list(x), [r["domain"] for r in rows])
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return figure_png(fig)


def add_args(ap: Any) -> None:
    ap.add_argument("joint", metavar="JOINT_CONFIG", help="e.g. configs/bench/joint_quality.yaml")
    ap.add_argument("--single", nargs="+", required=True, metavar="DOMAIN=CONFIG",
                    help="each domain's single-domain quality config, e.g. toys=configs/bench/toys_quality.yaml "
                         "(its full-mode runs), or the result file such a run recorded (DOMAIN=RESULT.json: "
                         "its GRLM row, on the same test users)")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value",
                    help="overrides for every config (e.g. run.root=... data.base_dir=...)")


def run(args: Any) -> dict[str, Any]:
    from grlm_ray.bench.common import DEFAULT_OUT
    from grlm_ray.core.config import load_config

    joint_cfg = load_config(args.joint, list(args.set))
    singles = {}
    for spec in args.single:
        dom, _, path = spec.partition("=")
        if not path:
            raise GrlmError(f"--single {spec!r}: expected DOMAIN=CONFIG")
        singles[dom] = Path(path) if path.endswith(".json") else load_config(path, list(args.set))
    result = joint_vs_single(joint_cfg, singles)
    result["command"] = " ".join(["grlm bench joint", args.joint, "--single", *args.single,
                                  *(["--set", *args.set] if args.set else [])])
    out_dir = getattr(args, "out_dir", None) or DEFAULT_OUT
    result["out_dir"], result["file_name"] = out_dir, f"joint_{joint_cfg.run.name}"
    png = Path(out_dir) / f"joint_{joint_cfg.run.name}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    t = result["training"]
    png.write_bytes(plot(result["rows"], f"{joint_cfg.run.name}: joint {t['joint_minutes']} training min vs "
                                         f"{t['single_minutes_sum']} for the single models"))
    result["plot"] = str(png)
    return result
