"""`grlm <verb> CONFIG [key.sub=value ...]` — thin: parse, load the config, call the stage function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grlm_ray.core.config import split_args
from grlm_ray.core.errors import GrlmError

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _cmd_demo(ns: argparse.Namespace) -> int:
    from grlm_ray.core.config import load_config
    from grlm_ray.flows.pipeline import format_summary, run_pipeline

    path, overrides = split_args(ns.args, required=False)
    if path is None and DEMO_CONFIG.is_file():
        path = str(DEMO_CONFIG)
    cfg = load_config(path, overrides)
    print(format_summary(run_pipeline(cfg)))
    return 0


def _stage_cmd(stage: str):
    def run(ns: argparse.Namespace) -> int:
        from grlm_ray.core.config import load_config
        from grlm_ray.flows.pipeline import format_summary, run_pipeline, upstream

        path, overrides = split_args(ns.args, required=True)
        cfg = load_config(path, overrides)
        if ns.redo:
            from grlm_ray.core.run import Run
            from grlm_ray.core.storage import mark_redo

            if not mark_redo(Run.of(cfg).store, cfg.run.name, stage):
                print(f"{stage}: not run yet in {cfg.run.root}/{cfg.run.name}: running it (nothing to redo)")
        # upstream stages run too: they are skipped when already complete for this config
        print(format_summary(run_pipeline(cfg, stages=upstream(stage, cfg))))
        return 0

    return run


def _cmd_diagnose(ns: argparse.Namespace) -> int:
    from grlm_ray.core.config import load_config
    from grlm_ray.lib.diagnose import diagnose, format_report

    path, overrides = split_args(ns.args, required=True)
    print(format_report(diagnose(load_config(path, overrides), users=ns.users, rows=ns.rows)))
    return 0


def _cmd_validate(ns: argparse.Namespace) -> int:
    from grlm_ray.core.config import load_config
    from grlm_ray.flows.pipeline import check_inputs

    path, overrides = split_args(ns.args, required=True)
    cfg = load_config(path, overrides)
    print(cfg.to_yaml(), end="")
    problems = check_inputs(cfg)
    if problems:
        print("\nINVALID:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    print(f"\nOK: {path} is valid")
    return 0


def _cmd_status(ns: argparse.Namespace) -> int:
    import json

    from grlm_ray.core.config import load_config
    from grlm_ray.flows.status import format_status, run_status

    path, overrides = split_args(ns.args, required=True)
    cfg = load_config(path, overrides)
    rows = run_status(cfg)
    print(json.dumps(rows, indent=1) if ns.json else format_status(cfg, rows))
    return 0


def _cmd_stats(ns: argparse.Namespace) -> int:
    from grlm_ray.core.config import S3Config
    from grlm_ray.lib.stats import dataset_stats, format_stats

    s3 = S3Config(endpoint_url=ns.s3_endpoint) if ns.s3_endpoint else None
    stats = dataset_stats(ns.path, s3)
    print(json.dumps(stats, indent=2) if ns.json else format_stats(stats))
    return 0


def _cmd_serve(ns: argparse.Namespace) -> int:
    import signal
    import threading

    from grlm_ray.core.config import load_config
    from grlm_ray.core.runtime import init_ray, metrics_url

    path, overrides = split_args(ns.args, required=True)
    cfg = load_config(path, overrides)
    init_ray(cfg.ray)  # before grlm_ray.serving.app imports ray: a local head's listeners stay on loopback
    from grlm_ray.serving.app import start, stop

    url = start(cfg)
    print(f"serving {cfg.run.name} at {url}  (POST {url}/v1/recommend, GET {url}/healthz, {url}/docs); "
          f"Prometheus metrics at {metrics_url()}; Ctrl-C stops", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    stop(cfg)
    print("stopped", flush=True)
    return 0


def _cmd_compression_comparison(ns: argparse.Namespace) -> int:
    from grlm_ray.core.config import load_config
    from grlm_ray.flows.compare import compression_comparison, format_table

    path, overrides = split_args(ns.args, required=True)
    out = compression_comparison(load_config(path, overrides))
    print(format_table(out["rows"]))
    print(f"table + plot: {out['run']}/compare/ and MLflow run {out['mlflow_run_id']}")
    return 0


def _cmd_compare(ns: argparse.Namespace) -> int:
    import os

    from grlm_ray.flows.compare import format_table, table_from_mlflow

    if ns.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        uri = ns.tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    else:  # the store a run with the default config uses (tracking.tracking_uri: <run.root>/mlflow.db)
        from grlm_ray.core.config import load_config
        from grlm_ray.core.tracking import tracking_uri

        uri = tracking_uri(load_config(None, []))
    out, run_id = table_from_mlflow(ns.experiment, uri)
    if ns.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        print(f"{ns.experiment}: comparison of run {out['run']} (MLflow run {run_id}; terms {out['source']})")
        print(format_table(out["rows"]))
    return 0


def _cmd_bench(ns: argparse.Namespace) -> int:
    from grlm_ray.bench import main as bench_main

    return bench_main(ns.name, ns.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grlm", description="Generative recommendation with Term IDs on Ray.")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging, and Ray's and the libraries' own progress lines on the console")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    d = sub.add_parser("demo", help="run the whole pipeline on the built-in synthetic demo catalog")
    d.add_argument("args", nargs="*", metavar="[CONFIG] [key=value]", help="default: configs/demo.yaml")
    d.set_defaults(fn=_cmd_demo)

    from grlm_ray.core.registry import REGISTRY

    for spec in REGISTRY:  # one verb per stage of the declared graph
        verb, stage, text = spec.verb, spec.name, spec.help
        sp = sub.add_parser(verb, help=text)
        sp.add_argument("args", nargs="+", metavar="CONFIG [key=value]")
        sp.add_argument("--redo", action="store_true",
                        help="run this stage again although it is complete for this config (e.g. after a code "
                             "change); the stages after it run again when next asked for, the ones before are "
                             "reused (run.resume=false would redo every stage before it too)")
        sp.set_defaults(fn=_stage_cmd(stage))

    cc = sub.add_parser("compression-comparison",
                        help="IIFT + eval for every K of compress.ks and the raw terms; table + plot to MLflow")
    cc.add_argument("args", nargs="+", metavar="CONFIG [key=value]")
    cc.set_defaults(fn=_cmd_compression_comparison)

    cp = sub.add_parser("compare", help="print the latest compression comparison of an MLflow experiment")
    cp.add_argument("experiment", help="MLflow experiment name (e.g. grlm-demo)")
    cp.add_argument("--tracking-uri", default=None,
                    help="default: MLFLOW_TRACKING_URI, else runs/mlflow.db (the store of the default run.root)")
    cp.add_argument("--json", action="store_true", help="print JSON")
    cp.set_defaults(fn=_cmd_compare)

    from grlm_ray.bench import BENCHMARKS

    bn = sub.add_parser("bench", help="benchmarks: a table + JSON (with the machine) in benchmarks/results/",
                        description="benchmarks (grlm bench NAME --help for each one's options):\n" + "\n".join(
                            f"  {k:12s} {v[1]}" for k, v in BENCHMARKS.items()),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    bn.add_argument("name", choices=list(BENCHMARKS), metavar="NAME", help=", ".join(BENCHMARKS))
    bn.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")
    bn.set_defaults(fn=_cmd_bench)

    sv = sub.add_parser("serve", help="stage 6: serve a trained run on Ray Serve (HTTP on 127.0.0.1)")
    sv.add_argument("args", nargs="+", metavar="CONFIG [key=value]")
    sv.set_defaults(fn=_cmd_serve)

    dg = sub.add_parser("diagnose", help="what a trained model learned: train/eval token alignment, tokens per "
                        "TID, loss by token kind, per-position term accuracy (train/diagnostics.json + MLflow)")
    dg.add_argument("args", nargs="+", metavar="CONFIG [key=value]")
    dg.add_argument("--users", type=int, default=300, help="validation users (alignment, term accuracy)")
    dg.add_argument("--rows", type=int, default=400, help="training rows for the loss by token kind")
    dg.set_defaults(fn=_cmd_diagnose)

    v = sub.add_parser("validate", help="load a config, apply overrides, check its inputs exist")
    v.add_argument("args", nargs="+", metavar="CONFIG [key=value]")
    v.set_defaults(fn=_cmd_validate)

    stat = sub.add_parser("status", help="where a run stands: each stage's state, a training's newest checkpoint "
                                         "and validation (from the run's store: while a job runs, or after)")
    stat.add_argument("args", nargs="+", metavar="CONFIG [key=value]")
    stat.add_argument("--json", action="store_true", help="print JSON")
    stat.set_defaults(fn=_cmd_status)

    data = sub.add_parser("data", help="inspect datasets")
    dsub = data.add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    st = dsub.add_parser("stats", help="users, items, interactions, sequence-length percentiles")
    st.add_argument("path", help="a prepared stage folder or a bundle folder (local or s3://)")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL for s3:// paths")
    st.set_defaults(fn=_cmd_stats)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    from grlm_ray.core.runtime import configure_console

    configure_console(ns.verbose)
    try:
        return ns.fn(ns)
    except GrlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
