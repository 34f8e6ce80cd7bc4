"""The benchmark harness (`grlm bench`): tables, JSON with the machine, and the quality benchmark's
same-users guarantee. No timings are asserted here: benchmarks measure, tests check they run right."""

from __future__ import annotations

import json
import math
import re

import pytest

from grlm_ray.bench import BENCHMARKS, module, report
from grlm_ray.bench.common import describe, format_table
from grlm_ray.cli import main as cli_main
from grlm_ray.core.errors import ConfigError


def isolation_script(name, monkeypatch, tmp_path):
    """benchmarks/isolation/<name>.py loaded as a module, its result files going under tmp_path/results."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" /
                                                  "isolation" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RESULTS", tmp_path / "results")
    return mod


def test_every_benchmark_module_has_the_harness_interface():
    for name in BENCHMARKS:
        mod = module(name)
        assert callable(mod.add_args) and callable(mod.run), name
    with pytest.raises(ConfigError, match="unknown benchmark 'nope'"):
        module("nope")


def test_report_prints_tables_and_writes_json_with_the_machine(tmp_path, capsys):
    rows = [{"setting": "a", "seconds": 1.23456, "ok": True}, {"setting": "bb", "seconds": 12.5, "ok": None}]
    path = report("toy", {"rows": rows, "ratios": {"a_vs_b": 0.1}}, str(tmp_path))
    out = capsys.readouterr().out
    assert "setting" in out and "1.2346" in out and "12.5" in out and "a_vs_b" in out
    saved = json.loads(open(path).read())
    assert saved["benchmark"] == "toy" and saved["rows"] == rows
    assert saved["machine"]["logical_cpus"] >= 1 and "torch" in saved["machine"]["versions"]
    assert not list(tmp_path.glob("*.tmp"))


def test_format_table_aligns_columns_and_marks_missing_values():
    lines = format_table([{"m": "GRLM", "r": 0.1}, {"m": "popularity", "r": None}]).splitlines()
    assert len({len(x.rstrip()) for x in lines[:2]}) == 1
    assert lines[3].split() == ["popularity", "-"]


def test_machine_description_names_cpu_memory_and_commit():
    m = describe()
    assert m["memory_gib"] and m["python"] and "gpu" in m
    flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "").split()
    assert m["cpu_native_bf16"] is ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_bench_help_lists_every_benchmark(capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in BENCHMARKS)


@pytest.mark.ray
@pytest.mark.slow
def test_quality_benchmark_scores_grlm_ablation_and_baselines_on_the_same_users(tiny_trained_run, tmp_path, capsys):
    overrides = tiny_trained_run + ["bench.sample_users=24", "bench.ablations=[unconstrained]",
                                    "bench.baselines=[sasrec_ce]", "baseline.epochs=2", "baseline.hidden_size=16",
                                    "eval.num_beams=10", "eval.ks=[5,10]", "eval.batch_size=8",
                                    "bench.content_fills=[2,10]"]
    assert cli_main(["bench", "quality", "--out-dir", str(tmp_path), *overrides]) == 0
    out = capsys.readouterr().out
    [path] = tmp_path.glob("quality_*_sample.json")
    res = json.loads(path.read_text())
    rows = {r["model"]: r for r in res["rows"]}
    fill = res["content_fill"]  # chosen on 24 validation users: every value tried is recorded
    assert [p["content_fill"] for p in fill["points"]] == [0, 2, 10] and fill["users"] == 24
    with_fill = [f"GRLM + {fill['chosen']} text neighbours"] if fill["chosen"] else []
    assert list(rows) == ["GRLM", "GRLM unconstrained", *with_fill, "SASRec-CE", "popularity"]
    _check_content_fill(tiny_trained_run, res, fill)
    assert all(r["users"] == 24 for r in rows.values())
    assert res["sample"]["users"] == 24 and res["sample"]["limit"] == 24 and len(res["sample"]["user_ids_sha1"]) == 40
    assert rows["GRLM"]["vr_at_10"] == 1.0  # constrained: every beam is a catalog item
    assert rows["GRLM unconstrained"]["vr_at_10"] <= 1.0
    assert rows["popularity"]["distinct_top1"] == 1 and 0 < rows["SASRec-CE"]["coverage_at_10"] <= 1
    assert rows["GRLM"]["train_s"] > 0 and rows["SASRec-CE"]["train_s"] > 0 and rows["popularity"]["train_s"] is None
    assert res["machine"]["logical_cpus"] >= 1 and res["runs"]["eval"].endswith("-sample")
    assert "SASRec-CE" in out and "GRLM unconstrained" in out
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG" and res["mlflow_run_id"]
    # a second call finds every stage complete and recomputes nothing (same numbers)
    assert cli_main(["bench", "quality", "--out-dir", str(tmp_path), *overrides]) == 0
    again = json.loads(path.read_text())
    assert again["rows"] == res["rows"]


def _check_content_fill(overrides, res, fill):
    """The bench's choice recomputed with the cold-start bench's content baseline (a full stable sort of every
    item), and ``eval.content_fill`` through the eval stage itself: its lists are the plain evaluation's with the
    last places refilled, the filled items marked ``content_neighbour``."""
    from grlm_ray.bench.cold_start import content_rankings, last_items
    from grlm_ray.bench.quality import plan
    from grlm_ray.core.config import load_config
    from grlm_ray.core.run import Run
    from grlm_ray.core.storage import copy_stages, read_manifest
    from grlm_ray.flows.pipeline import run_pipeline, upstream
    from grlm_ray.lib.embeddings import catalog_embeddings
    from grlm_ray.lib.eig import fill_content
    from grlm_ray.lib.metrics import recall_at_k

    runs = plan(load_config(None, overrides + ["bench.sample_users=24", "bench.content_fills=[2,10]"]))
    ids, emb = catalog_embeddings(runs["train"], [])

    def lists(cfg):
        p = Run.of(cfg).read_table("eval", "predictions.parquet")
        users = p.column("user_id").to_pylist()
        return users, p.column("target_item_id").to_pylist(), p.column("ranked_item_ids").to_pylist(), \
            p.column("grounded_by").to_pylist(), content_rankings(ids, emb, last_items(cfg, users), 10)

    _, targets, ranked, _, near = lists(runs["eval_valid"])
    for point in fill["points"]:
        got = [fill_content(r, c, point["content_fill"], 10) for r, c in zip(ranked, near)]
        assert point["recall_at_10"] == round(sum(recall_at_k(g, t, 10) for g, t in zip(got, targets)) / 24, 6)
    best = max(fill["points"], key=lambda q: (q["recall_at_10"], q["ndcg_at_10"], -q["content_fill"]))
    assert fill["chosen"] == best["content_fill"]
    # the switch itself, whatever was chosen: 3 places on the test users
    c = load_config(None, overrides + [f"run.name={runs['eval'].run.name}-fill3", "eval.content_fill=3",
                                       "eval.limit_users=24", "eval.num_beams=10", "eval.ks=[5,10]"])
    copy_stages(Run.of(c).store, runs["train"].run.name, c.run.name, upstream("train", c))
    run_pipeline(c, stages=("eval",))
    users, _, plain, _, near = lists(runs["eval"])
    users3, _, filled, how, _ = lists(c)
    assert users3 == users and res["runs"]["eval"] == runs["eval"].run.name
    assert filled == [fill_content(r, n, 3, 10) for r, n in zip(plain, near)]
    assert any(f != r for f, r in zip(filled, plain))
    for f, r, h in zip(filled, plain, how):
        assert [x == "content_neighbour" for x in h] == [i not in r for i in f]
    metrics = Run.of(c).store.read_json(f"{c.run.name}/eval/metrics.json")
    assert metrics["protocol"]["content_fill"] == {"slots": 3, "depth": 10, "anchor": "last history item",
                                                   "pool": "catalog"}
    # the fill only re-ranks: the plain evaluation's beams were reused, not decoded again; a decoding setting
    # changed (fewer beams) decodes
    info = read_manifest(Run.of(c).store, c.run.name, "eval")["info"]
    plain_info = read_manifest(Run.of(c).store, runs["eval"].run.name, "eval")["info"]
    assert "decoded_reused" not in plain_info
    # the reused seconds are stored to 3 decimals, the plain stage's to 2: rounding the rounded value twice can
    # differ by one in the last place (8.295 -> 8.29 vs 8.2951 -> 8.3), so compare within the two roundings
    assert plain_info["seconds_generation"] > 0
    assert abs(info["decoded_reused"]["seconds"] - plain_info["seconds_generation"]) <= 0.0055
    assert [r["candidates"] for r in Run.of(c).read_table("eval", "predictions.parquet").to_pylist()] == \
        [r["candidates"] for r in Run.of(runs["eval"]).read_table("eval", "predictions.parquet").to_pylist()]
    beams8 = load_config(None, overrides + [f"run.name={runs['eval'].run.name}-b8", "eval.num_beams=8",
                                            "eval.limit_users=24", "eval.ks=[5,10]", "eval.content_fill=3"])
    copy_stages(Run.of(c).store, runs["train"].run.name, beams8.run.name, upstream("train", beams8))
    run_pipeline(beams8, stages=("eval",))
    assert "decoded_reused" not in read_manifest(Run.of(c).store, beams8.run.name, "eval")["info"]


def test_diversity_counts_distinct_recommendations():
    from grlm_ray.bench.quality import diversity

    same = diversity([["a", "b"], ["a", "b"], ["a", "c"]], catalog=10, k=2)
    assert same == {"distinct_top1": 1, "coverage_at_2": 0.3}


def test_scale_sampler_sees_a_childs_memory_and_splits_shared_pages(tmp_path):
    """``grlm bench scale``'s sampler: a child's private pages show in its RSS and PSS; pages shared by
    a parent and its forked child count fully in both RSS values but are split between their PSS."""
    import sys

    from grlm_ray.bench.scale import measure

    code = ("import os, time, numpy as np\n"
            "a = np.ones(200 * 2**20 // 8)\n"  # 200 MB touched before the fork: shared copy-on-write
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    b = np.ones(100 * 2**20 // 8); time.sleep(1.5); os._exit(0)\n"
            "time.sleep(1.5); os.waitpid(pid, 0)\n")
    m = measure([sys.executable, "-c", code], tmp_path / "log")
    assert m["rc"] == 0
    assert m["driver_peak_rss_mb"] >= 200 and m["other_peak_rss_mb"] >= 300  # the child: shared 200 + own 100
    assert m["other_peak_pss_mb"] < m["other_peak_rss_mb"] - 50  # its share of the 200 MB only
    assert m["tree_peak_pss_mb"] < m["tree_peak_rss_mb"] - 100  # the shared pages counted once in the PSS sum


def test_joint_vs_single_compares_each_domain_on_the_same_users_and_refuses_other_users(tmp_path, capsys):
    """`grlm bench joint`: per domain the single model's and the joint model's R/N@10 (from their finished runs),
    the other-domain share, training minutes; refused when a domain's test users differ or a run is missing."""
    import pyarrow as pa

    from grlm_ray.core.storage import Store

    store = Store(str(tmp_path / "runs"))

    def finished(run: str, stage: str, info: dict) -> None:
        store.write_json(f"{run}/{stage}/_manifest.json", {"status": "complete", "config_hash": "x", "info": info})

    def predictions(run: str, users: list[str]) -> None:
        store.write_table(f"{run}/eval/predictions.parquet", pa.table({"user_id": users, "split": ["test"] * len(users)}))

    m = lambda r, n, **kw: {"recall_at_10": r, "ndcg_at_10": n, **kw}  # noqa: E731
    finished("joint", "eval", {"metrics": m(0.05, 0.03), "per_domain": {
        "a": m(0.06, 0.04, cross_domain_at_10=0.1, users=3), "b": m(0.04, 0.02, cross_domain_at_10=0.0, users=2)}})
    # the joint run was stopped and resumed before the train stage recorded the loop's clock: its manifest holds
    # the last attempt's wall time (600 s), its validation curve the clock at the last step (15 min)
    finished("joint", "train", {"train_seconds": 600, "steps": 20, "plan": {"rows_per_step": 64}})
    store.write_json("joint/train/validation_curve.json", [{"step": 10, "train_minutes": 7.0},
                                                          {"step": 20, "train_minutes": 15.0}])
    predictions("joint", ["a/1", "a/2", "a/3", "b/7", "b/8"])
    for dom, users, r, n, train in (("a", ["1", "2", "3"], 0.05, 0.04, {"train_seconds": 300, "attempt_seconds": 330}),
                                    ("b", ["7", "8"], 0.05, 0.025, {"train_seconds": 360})):
        finished(f"s{dom}-full", "eval", {"metrics": m(r, n)})
        finished(f"s{dom}", "train", {**train, "steps": 10 if dom == "a" else 12})
        predictions(f"s{dom}-full", users)
        (tmp_path / f"{dom}.yaml").write_text(f"run: {{name: s{dom}, root: {tmp_path / 'runs'}}}\n")
    (tmp_path / "joint.yaml").write_text(
        f"run: {{name: joint, root: {tmp_path / 'runs'}}}\n"
        "data: {mode: joint, domains: {a: {kind: synthetic}, b: {kind: synthetic}}}\n")
    argv = ["bench", "joint", str(tmp_path / "joint.yaml"), "--single", f"a={tmp_path / 'a.yaml'}",
            f"b={tmp_path / 'b.yaml'}", "--out-dir", str(tmp_path / "out")]
    assert cli_main(argv) == 0
    saved = json.loads((tmp_path / "out" / "joint_joint.json").read_text())
    rows = {r["domain"]: r for r in saved["rows"]}
    assert rows["a"]["recall_ratio"] == 1.2 and rows["b"]["ndcg_ratio"] == 0.8 and rows["a"]["users"] == 3
    assert rows["a"]["joint_other_domain_at_10"] == 0.1
    training = {k: v for k, v in saved["training"].items() if k != "clock"}
    assert training == {"joint_minutes": 15.0, "single_minutes_sum": 11.0, "joint_over_sum": 1.364, "joint_steps": 20,
                        "single_steps_sum": 22, "joint_steps_over_sum": 0.909, "rows_per_step": 64}
    assert rows["a"]["single_train_minutes"] == 5.0 and rows["b"]["single_steps"] == 12
    assert (tmp_path / "out" / "joint_joint.png").stat().st_size > 0
    # a domain's single model from the result file its full-mode quality run recorded: the same row, users checked
    # by the digest it saved
    import hashlib

    digest = hashlib.sha1("\n".join(["7", "8"]).encode()).hexdigest()
    recorded = {"benchmark": "quality", "time": "t", "runs": {"train": "sb"}, "rows": [
        {"model": "GRLM", "recall_at_10": 0.05, "ndcg_at_10": 0.025, "train_s": 360}, {"model": "popularity"}],
        "training": {"grlm": {"steps": 12, "train_seconds": 340}},  # recorded before the loop's clock: train_s
        "sample": {"mode": "full", "split": "test", "users": 2, "user_ids_sha1": digest}}
    (tmp_path / "b.json").write_text(json.dumps(recorded))
    by_file = [*argv[:5], f"b={tmp_path / 'b.json'}", *argv[6:]]
    assert cli_main(by_file) == 0
    again = json.loads((tmp_path / "out" / "joint_joint.json").read_text())
    assert again["rows"] == saved["rows"] and again["training"] == saved["training"]
    assert again["runs"]["b"].startswith("b.json (t, run sb)")
    (tmp_path / "b.json").write_text(json.dumps({**recorded, "sample": {**recorded["sample"], "user_ids_sha1": "0"}}))
    capsys.readouterr()
    assert cli_main(by_file) == 2 and re.search(r"domain 'b'.*not the same users", capsys.readouterr().err)
    (tmp_path / "b.json").write_text(json.dumps({**recorded, "sample": {**recorded["sample"], "mode": "sample"}}))
    assert cli_main(by_file) == 2 and "not a full-mode quality result" in capsys.readouterr().err
    predictions("sb-full", ["7", "9"])  # another user: not the same users
    capsys.readouterr()
    assert cli_main(argv) == 2
    assert re.search(r"domain 'b'.*not the same users", capsys.readouterr().err)
    store.delete_dir("sa-full/eval")
    assert cli_main(argv) == 2
    assert re.search(r"run 'sa-full' has no finished eval stage.*bench.mode=full", capsys.readouterr().err)


def test_time_to_quality_reads_curves_at_equal_tokens_and_names_an_arm_without_them(tmp_path, monkeypatch):
    """benchmarks/isolation/time_to_quality.py --x tokens: the best validation score each arm had reached by each
    mark of training tokens, a plot against tokens; a run whose points predate the token count is named."""

    ttq = isolation_script("time_to_quality", monkeypatch, tmp_path)

    def run(name, points):
        (tmp_path / name / "train").mkdir(parents=True)
        (tmp_path / name / "train" / "validation_curve.json").write_text(json.dumps(points))
        return f"{name}={tmp_path / name}"

    pt = lambda step, tok, r, n: {"step": step, "epoch": step / 10, "train_minutes": step / 2,  # noqa: E731
                                  "train_tokens": tok, "recall_at_10": r, "ndcg_at_10": n}
    a = run("a", [pt(10, 1_000_000, 0.02, 0.01), pt(20, 2_000_000, 0.05, 0.03), pt(30, 3_000_000, 0.04, 0.02)])
    b = run("b", [pt(10, 2_500_000, 0.06, 0.02)])
    assert ttq.main(["--name", "t", "--arm", a, "--arm", b, "--x", "tokens", "--marks", "1", "2.5"]) == 0
    out = json.loads((tmp_path / "results" / "t.json").read_text())
    rows = {r["arm"]: r for r in out["rows"]}
    assert rows["a"]["r10_by_1M"] == 0.02 and rows["a"]["r10_by_2.5M"] == 0.05 and rows["a"]["best_at_tokens"] == 2_000_000
    assert rows["b"]["r10_by_1M"] is None and rows["b"]["r10_by_2.5M"] == 0.06
    assert out["x"] == "tokens" and "--x tokens --marks 1 2.5" in out["command"]
    assert (tmp_path / "results" / "t.png").stat().st_size > 0
    old = run("old", [{k: v for k, v in pt(10, 0, 0.01, 0.01).items() if k != "train_tokens"}])
    assert ttq.main(["--name", "m", "--arm", a, "--arm", old]) == 0  # minutes (the default): every run has them
    (ra, _) = json.loads((tmp_path / "results" / "m.json").read_text())["rows"]
    assert ra["r10_by_15min"] == 0.05 and ra["r10_by_90min"] == 0.05 and "best_at_tokens" not in ra
    with pytest.raises(SystemExit, match="'old'.*no 'train_tokens'"):
        ttq.main(["--name", "t2", "--arm", old, "--x", "tokens", "--marks", "1"])
    with pytest.raises(SystemExit):  # tokens without marks: argparse's usage error
        ttq.main(["--name", "t3", "--arm", a, "--x", "tokens"])
    kept = tmp_path / "kept_curve.json"  # a curve kept on its own, its run folder gone
    kept.write_text((tmp_path / "b" / "train" / "validation_curve.json").read_text())
    assert ttq.main(["--name", "k", "--arm", a, "--arm", f"b kept={kept}", "--x", "tokens", "--marks", "2.5"]) == 0
    rows = {r["arm"]: r for r in json.loads((tmp_path / "results" / "k.json").read_text())["rows"]}
    assert rows["b kept"]["r10_by_2.5M"] == 0.06
    kept.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="a JSON list of validation points"):
        ttq.main(["--name", "k2", "--arm", f"b={kept}", "--x", "tokens", "--marks", "1"])


def test_time_to_quality_scores_popularity_on_the_validation_users_the_run_drew(tmp_path, monkeypatch):
    """--popularity RUN: items ranked by training interactions (held-out positions removed) scored on the
    targets in RUN's train/validation.parquet, recorded beside the arms; a run without them is named."""
    import math

    import pyarrow as pa
    import pyarrow.parquet as pq

    ttq = isolation_script("time_to_quality", monkeypatch, tmp_path)
    run = tmp_path / "r"
    (run / "prepare").mkdir(parents=True)
    (run / "train").mkdir()
    # "z" is bought most, but only as held-out targets (positions 3 and 4): popularity must not count it
    seqs = {"u1": ["a", "b", "a", "z", "z"], "u2": ["b", "a", "c", "z", "z"], "u3": ["c", "a", "b", "z", "z"]}
    pq.write_table(pa.table({"user_id": list(seqs), "item_ids": list(seqs.values()),
                             "timestamps": pa.nulls(3, pa.list_(pa.int64()))}), run / "prepare" / "sequences.parquet")
    pq.write_table(pa.table({"user_id": [u for u in seqs for _ in (0, 1)], "split": ["valid", "test"] * 3,
                             "domain": ["x"] * 6, "position": pa.array([3, 4] * 3, pa.int32()),
                             "target_item_id": ["z"] * 6}), run / "prepare" / "targets.parquet")
    (run / "train" / "validation_curve.json").write_text(json.dumps(
        [{"step": 1, "epoch": 0.1, "train_minutes": 1.0, "train_tokens": 10, "recall_at_10": 0.5, "ndcg_at_10": 0.3}]))
    # two validation users: one whose target is the top training item "a" (4 of 9 training interactions), one "c"
    pq.write_table(pa.table({"user_id": ["u1", "u2"], "domain": ["x", "x"], "target_item_id": ["a", "c"],
                             "prompt": ["p", "p"]}), run / "train" / "validation.parquet")
    floor = ttq.popularity_floor(run, ks=(1, 10))
    assert floor["users"] == 2 and floor["recall_at_1"] == 0.5 and floor["recall_at_10"] == 1.0
    assert floor["ndcg_at_10"] == pytest.approx((1 + 1 / math.log2(4)) / 2)  # ranks 1 and 3 (a, b, c; z absent)
    assert ttq.main(["--name", "p", "--arm", f"r={run}", "--popularity", str(run)]) == 0
    out = json.loads((tmp_path / "results" / "p.json").read_text())
    assert out["popularity"]["users"] == 2 and out["command"].endswith("--popularity <root>/r")
    (run / "train" / "validation.parquet").unlink()
    with pytest.raises(SystemExit, match="train/validation.parquet is missing"):
        ttq.popularity_floor(run)


def test_paired_arms_counts_users_hit_by_one_arm_only_and_refuses_other_users(tmp_path, monkeypatch, capsys):
    """Two arms on the same users: hits, the discordant counts with the exact sign test (hand-computed), distinct
    lists (an arm giving everyone one list shows share 1.0); the stage's recorded R@10 is checked; arms evaluated on
    other users are refused."""

    import pyarrow as pa
    import pyarrow.parquet as pq

    pa_mod = isolation_script("paired_arms", monkeypatch, tmp_path)

    def arm(name, ranked, users=("u1", "u2", "u3", "u4", "u5"), recall=None):
        run = tmp_path / name
        (run / "eval").mkdir(parents=True)
        pq.write_table(pa.table({"user_id": list(users), "target_item_id": ["a", "b", "c", "d", "e"][:len(users)],
                                 "ranked_item_ids": ranked}), run / "eval" / "predictions.parquet")
        if recall is not None:
            (run / "eval" / "metrics.json").write_text(json.dumps({"model": {"overall": {"recall_at_2": recall}}}))
        return run

    # A hits u1 (rank 1), u2 (rank 2), u3 (rank 1); B gives everyone ["a", "x"]: hits u1 only
    a = arm("A", [["a", "x"], ["y", "b"], ["c", "y"], ["x", "y"], ["x", "y"]], recall=0.6)
    b = arm("B", [["a", "x"]] * 5, recall=0.2)
    # A was trained in its run folder: what it trained is reported with its scores (B has no training there)
    (a / "train").mkdir()
    (a / "train" / "_manifest.json").write_text(json.dumps({"info": {
        "backbone": {"parameters": 972_160, "vocab_size": 1438}, "precision": "fp32", "steps": 30,
        "train_seconds": 12.5}}))
    (a / "train" / "validation_curve.json").write_text(json.dumps([{"epoch": 1.0, "recall_at_10": 0.1,
                                                                   "ndcg_at_10": 0.05, "step": 30}]))
    assert pa_mod.main(["--name", "t", "--k", "2", "--arm", f"A={a}", "--arm", f"B={b}"]) == 0
    out = json.loads((tmp_path / "results" / "t.json").read_text())
    assert out["arms"]["A"]["recall_at_2"] == 0.6 and out["arms"]["A"]["hits"] == 3
    assert out["arms"]["A"]["training"] == {"parameters": 972_160, "vocab_size": 1438, "precision": "fp32",
                                            "steps": 30, "train_seconds": 12.5, "validation_curve": [
                                                {"epoch": 1.0, "recall_at_10": 0.1, "ndcg_at_10": 0.05}]}
    assert "training" not in out["arms"]["B"]
    assert out["arms"]["A"]["ndcg_at_2"] == pytest.approx(round((2 + 1 / math.log2(3)) / 5, 6))
    assert out["arms"]["B"]["distinct_top2_lists"] == 1 and out["arms"]["B"]["most_common_top2_share"] == 1.0
    assert out["arms"]["A"]["distinct_top1"] == 4 and out["arms"]["A"]["most_common_top2_share"] == 0.4
    [pair] = out["pairs"]
    assert (pair["both"], pair["only_a"], pair["only_b"]) == (1, 2, 0)
    assert pair["sign_test_p"] == 0.5  # 2 discordant users, both for A: 2 * (1/2)^2
    assert pa_mod.sign_test_p(10, 4) == pytest.approx(2 * sum(math.comb(14, i) for i in range(5)) / 2 ** 14)
    assert pa_mod.sign_test_p(0, 0) == 1.0 and pa_mod.sign_test_p(3, 3) == 1.0
    printed = capsys.readouterr().out
    assert "exact sign test p = 0.5000" in printed and "params M" in printed and "0.97" in printed
    other = arm("C", [["a", "x"]] * 4, users=("u1", "u2", "u3", "u9"))
    with pytest.raises(SystemExit, match="other users or targets"):
        pa_mod.main(["--name", "t2", "--arm", f"A={a}", "--arm", f"C={other}"])
    wrong = arm("D", [["a", "x"]] * 5, recall=0.4)  # its metrics.json disagrees with its predictions
    with pytest.raises(SystemExit, match="recall_at_2 0.4"):
        pa_mod.main(["--name", "t3", "--k", "2", "--arm", f"A={a}", "--arm", f"D={wrong}"])


def test_target_groups_splits_hits_by_the_targets_rare_terms_and_popularity(tmp_path, monkeypatch, capsys):
    """Targets grouped by whether their TID (in the reference run) has a term no other item uses, and by their
    training popularity: each arm's hits per group, hand-counted; arms on other users are refused."""

    import pyarrow as pa
    import pyarrow.parquet as pq

    tg = isolation_script("target_groups", monkeypatch, tmp_path)
    ref = tmp_path / "ref"
    (ref / "sft").mkdir(parents=True)
    (ref / "prepare").mkdir()
    # 'a' has the one-item term 'zeta'; 'b', 'c' share all their terms with another item
    pq.write_table(pa.table({"item_id": ["a", "b", "c"], "terms": [["x", "zeta"], ["x", "y"], ["y", "x"]]}),
                   ref / "sft" / "terms.parquet")
    # training interactions (each history without its last two): a x1, b x6, c x0
    pq.write_table(pa.table({"item_ids": [["a"] + ["b"] * 6 + ["c", "a"], ["c", "b"]]}),
                   ref / "prepare" / "sequences.parquet")

    def arm(name, ranked, users=("u1", "u2", "u3")):
        run = tmp_path / name
        (run / "eval").mkdir(parents=True)
        pq.write_table(pa.table({"user_id": list(users), "target_item_id": ["a", "b", "c"][:len(users)],
                                 "ranked_item_ids": ranked}), run / "eval" / "predictions.parquet")
        return run

    full = arm("full", [["a"], ["b"], ["c"]])
    part = arm("part", [["b"], ["b"], ["a"]])  # loses the rare-term target a and c
    assert tg.main(["--name", "g", "--terms", str(ref), "--arm", f"F={full}", "--arm", f"P={part}"]) == 0
    out = json.loads((tmp_path / "results" / "g.json").read_text())
    rows = {r["group"]: r for r in out["rows"]}
    assert out["catalog"] == {"items": 3, "terms": 3, "rare_terms": 1, "items_with_a_rare_term": 1}
    rare = rows["rare term (<= 1 items) / all"]
    assert (rare["users"], rare["F hits"], rare["P hits"], rare["P hits lost vs F"]) == (1, 1, 0, 1)
    assert rows["rare term (<= 1 items) / <=5"]["users"] == 1
    assert rows["no rare term / 6-15"]["users"] == 1 and rows["no rare term / 6-15"]["P hits"] == 1
    assert rows["no rare term / <=5"]["P R@10"] == 0.0 and rows["all"]["P R@10"] == round(1 / 3, 6)
    assert "1 of 3 terms are used by <= 1 items" in capsys.readouterr().out
    other = arm("other", [["a"], ["b"]], users=("u1", "u9"))
    with pytest.raises(SystemExit, match="other users or targets"):
        tg.main(["--name", "g2", "--terms", str(ref), "--arm", f"F={full}", "--arm", f"O={other}"])


def test_arrival_queries_counts_placed_gated_and_content_hits(monkeypatch, tmp_path):
    """benchmarks/isolation/arrival_queries.py on hand-built unit vectors: the decayed history query, and which
    targets a placement (ungated, within the query's 10 nearest catalog items) and the content top 10 find."""
    import numpy as np

    mod = isolation_script("arrival_queries", monkeypatch, tmp_path)
    at = {"a": 0, "b": 1}
    emb = np.eye(2, dtype=np.float32)
    q = mod.query_vectors(emb, at, [["a", "b"], ["b"], ["zz"]], 2, 0.5)
    assert np.allclose(q[0], np.array([0.5, 1.0]) / np.linalg.norm([0.5, 1.0]))  # b last (1), a before it (0.5)
    assert np.allclose(q[1], [0, 1]) and not q[2].any()  # no known item: a zero row
    # a catalog of 12 seen items far from the query and 3 new ones: the target is the 2nd-nearest new item and
    # within the 10 nearest catalog items; a user without a query finds nothing
    rng = np.random.default_rng(0)
    d = 16
    base = np.zeros((15, d), dtype=np.float32)
    base[:12] = rng.normal(size=(12, d))
    base[:12, 0] = -5  # seen items: away from the query direction e0
    base[12] = np.eye(d)[0]
    base[13] = np.eye(d)[0] * 0.9 + np.eye(d)[1] * 0.1
    base[14] = np.eye(d)[1]
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    query = np.zeros((2, d), dtype=np.float32)
    query[0, 0] = 1
    out = mod.found(query, [-1, -1], [13, 13], np.array([12, 13, 14]), base)
    assert out["users"] == 2
    assert out["placed"] == {"1": 0.0, "2": 0.5, "3": 0.5, "4": 0.5, "5": 0.5, "10": 0.5}
    assert out["placed_within10"] == out["placed"] and out["content_top10"] == 0.5
    # the user's last item excluded from the rankings: the target's rival (item 12) as last item -> found at 1 slot
    out = mod.found(query[:1], [12], [13], np.array([12, 13, 14]), base)
    assert out["placed"]["1"] == 1.0
    # eleven seen items nearer the query than the new ones: the target placed at 2 slots, never within the 10 nearest
    near = base.copy()
    near[:11] = np.eye(d)[0] * 0.99 + rng.normal(size=(11, d)) * 0.01
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    out = mod.found(query[:1], [-1], [13], np.array([12, 13, 14]), near)
    assert out["placed"]["1"] == 0.0 and out["placed"]["2"] == 1.0
    assert out["placed_within10"]["10"] == 0.0 and out["content_top10"] == 0.0


def test_placements_count_the_new_items_a_last_item_rule_would_put_in_a_seen_targets_list(monkeypatch, tmp_path):
    """arrival_queries.placements on hand-built unit vectors: per floor, the new items above it (capped at the
    slots), within the last item's 10 nearest catalog items or not, and the users given at least one."""
    import numpy as np

    mod = isolation_script("arrival_queries", monkeypatch, tmp_path)
    d = 16
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(16, d)).astype(np.float32)
    emb[:, 0] = -3  # 12 seen items (0-11) and 4 new ones (12-15) all away from e0 ...
    emb[12] = np.eye(d)[0]  # ... but two new items at the last item's (row 0 turned to e0 below) side
    emb[13] = np.eye(d)[0] * 0.8 + np.eye(d)[1] * 0.6
    emb[0] = np.eye(d)[0] * 0.9 + np.eye(d)[2] * 0.1
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    new = np.array([12, 13, 14, 15])
    out = mod.placements([0, -1], new, emb, floors=(0.5, 0.9), slots=1)
    cos = emb[[12, 13]] @ emb[0]
    assert cos[0] >= 0.9 > cos[1] >= 0.5  # item 12 passes both floors, item 13 the lower one only
    by = {(p["min_cosine"], p["within"]): p for p in out["by_floor"]}
    assert out["users"] == 2 and out["slots"] == 1
    assert by[(0.5, 0)]["placed_per_user"] == 0.5  # two pass, one slot; the user without a last item: none
    assert by[(0.5, 0)]["users_with_a_placement"] == 0.5 and by[(0.9, 0)]["placed_per_user"] == 0.5
    assert by[(0.5, 10)] == {**by[(0.5, 0)], "within": 10}  # both among the 10 nearest of 15 others
    two = mod.placements([0], new, emb, floors=(0.5,), slots=3)
    assert two["by_floor"][0]["placed_per_user"] == 2.0
    assert two["nearest_new_cosine"] == round(float(cos.max()), 6)


def test_arrival_pairs_measure_how_near_each_buyers_last_item_is_to_what_they_bought(monkeypatch, tmp_path):
    """arrival_queries.pairs on hand-built unit vectors: the cosine floors and catalog ranks of the target seen
    from the last item (itself excluded); a buyer without a last item counts as near nothing."""
    import numpy as np

    mod = isolation_script("arrival_queries", monkeypatch, tmp_path)
    d = 32
    emb = np.zeros((25, d), dtype=np.float32)
    emb[0, 0] = 1  # the last item
    emb[1] = np.eye(d)[0] * 0.8 + np.eye(d)[1] * 0.6  # target A: cosine 0.8, the nearest other item
    for j in range(2, 24):  # 22 fillers at cosine 0.6 to item 0: target B (item 24, cosine 0.55) ranks 24th
        emb[j] = np.eye(d)[0] * 0.6 + np.eye(d)[j] * 0.8
    emb[24] = np.eye(d)[0] * 0.55 + np.eye(d)[24] * np.sqrt(1 - 0.55 ** 2)
    out = mod.pairs([0, 0, -1], [1, 24, 1], emb)
    assert out["users"] == 3
    assert out["cos_0.5"] == round(2 / 3, 6) and out["cos_0.65"] == round(1 / 3, 6)
    assert out["within_10"] == round(1 / 3, 6) and out["within_20"] == round(1 / 3, 6)
    assert out["within_20_cos_0.65"] == round(1 / 3, 6) and out["within_10_cos_0.5"] == round(1 / 3, 6)
    dens = mod.density([0], emb)  # item 0's nearest others: A at 0.8, then the fillers at 0.6
    assert dens["items"] == 1 and dens["nn1"] == 0.8 and abs(dens["nn10"] - 0.6) < 1e-6
    assert mod.density([], emb) == {"items": 0}
