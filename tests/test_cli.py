"""`grlm` verbs end to end on the built-in demo catalog (no Ray needed for one domain)."""

import json
import re

import pytest

from grlm_ray.cli import main


@pytest.mark.ray
@pytest.mark.slow
def test_demo_runs_then_skips_when_complete(tmp_path, capsys, ray_local, model_cache):
    args = ["demo", f"run.root={tmp_path}", "data.domains.demo.num_items=150", "data.domains.demo.num_users=300",
            "ctg.limit=4", "ctg.retries=0", f"ctg.llm.cache_dir={model_cache}", f"model.cache_dir={model_cache}",
            "train.max_steps=6", "train.log_every=3", "eval.limit_users=10", "eval.num_beams=5",
            "eval.max_new_tokens=16", "ray.progress_bars=false",
            # the CLI's flow is tested here, not DDP (tiny_trained_run, the job tests): one training process
            # saves a Ray Train start on each of the five trainings
            "train.strategy=single", "train.num_workers=1", "train.cpus_per_worker=2"]
    assert main(args) == 0
    captured = capsys.readouterr()
    out = captured.out
    # a readable console: grlm's lines and the summary; Ray Data's plans / progress snapshots, MLflow's store
    # set-up and the weight-loading bars stay in the log files
    console = [ln for ln in (captured.out + captured.err).splitlines() if ln.strip()]
    for noise in ("logging_progress", "Execution plan", "Loading weights", "Creating initial MLflow", "Writing model shards"):
        assert not any(noise in ln for ln in console), noise
    assert len(console) <= 40, "\n".join(console)
    stages = ("prepare", "embed", "neighbors", "ctg", "sft", "train", "eval")
    for stage in stages:
        assert re.search(rf"^{stage}\s+done in", out, re.M), out
    assert "users" in out and re.search(r"^\s+GRLM\s+[0-9.]+", out, re.M) and "popularity" in out
    assert (tmp_path / "demo" / "config.yaml").is_file()
    assert (tmp_path / "demo" / "train" / "model" / "grlm_model.json").is_file()
    from grlm_ray.core.registry import stage

    for name in stages:  # what the stage graph declares is there
        for out_name in stage(name).outputs:
            assert (tmp_path / "demo" / name / out_name).exists(), (name, out_name)
    manifest = json.loads((tmp_path / "demo" / "prepare" / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["outputs"]["sequences.parquet"] > 50
    assert main(args) == 0
    assert capsys.readouterr().out.count("skipped (already complete)") == len(stages)

    # chained keys: a change re-runs its stage and everything downstream of it, nothing else, and eval
    # always scores the model that is there now (never an older model's metrics)
    def ran(extra: list[str]) -> list[str]:
        assert main(args + extra) == 0
        out = capsys.readouterr().out
        assert all(re.search(rf"^{s}\s+(done in|skipped)", out, re.M) for s in stages), out
        return [s for s in stages if re.search(rf"^{s}\s+done in", out, re.M)]

    def eval_reads_current_model() -> bool:
        train = json.loads((tmp_path / "demo" / "train" / "_manifest.json").read_text())
        ev = json.loads((tmp_path / "demo" / "eval" / "_manifest.json").read_text())
        return ev["upstream"]["train"] == train["config_hash"]

    assert ran(["eval.num_beams=4"]) == ["eval"] and eval_reads_current_model()
    assert ran(["eval.num_beams=4", "ctg.num_terms=4"]) == ["ctg", "sft", "train", "eval"]
    assert eval_reads_current_model()
    from grlm_ray.core.storage import Store

    assert {len(t) for t in Store(str(tmp_path)).read_table("demo/sft/terms.parquet").column("terms").to_pylist()} == {4}
    assert ran(["eval.num_beams=4", "ctg.num_terms=4", "neighbors.k=6"]) == ["neighbors", "ctg", "sft", "train", "eval"]
    assert ran(["eval.num_beams=4", "ctg.num_terms=4", "neighbors.k=6", "embed.batch_size=32"]) == list(stages[1:])
    assert eval_reads_current_model()
    # `grlm sft CONFIG --redo`: that stage again with the stages before it reused; the ones after it run
    # again when next asked for (the saved config.yaml is the last run's, overrides included)
    assert main(["sft", str(tmp_path / "demo" / "config.yaml"), "--redo"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^sft\s+done in", out, re.M) and all(
        re.search(rf"^{s}\s+skipped", out, re.M) for s in stages[:4]), out
    assert ran(["eval.num_beams=4", "ctg.num_terms=4", "neighbors.k=6", "embed.batch_size=32"]) == ["train", "eval"]
    assert eval_reads_current_model()


def test_validate_reports_missing_inputs(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  domains:\n    shop: {kind: byo, items: nope.csv, interactions: nada.csv}\n")
    assert main(["validate", str(cfg), f"data.base_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "nope.csv" in err and "nada.csv" in err


def test_bad_config_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  k_kore: 5\n")
    assert main(["prep", str(cfg)]) == 2
    assert "data.k_kore" in capsys.readouterr().err


def test_stats_on_missing_folder_names_it(tmp_path, capsys):
    assert main(["data", "stats", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
