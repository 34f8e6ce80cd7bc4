"""The declared stage graph (grlm_ray/core/registry.py) against the code that runs it. No Ray, no models."""

import importlib

import pytest

from grlm_ray.core.config import GrlmConfig, load_config
from grlm_ray.core.registry import DEMO_STAGES, REGISTRY, STAGES, reads, stage, stage_key, upstream


@pytest.mark.parametrize("spec", REGISTRY, ids=lambda s: s.name)
def test_every_record_names_a_stage_module_that_runs_under_its_name(spec):
    module = importlib.import_module(spec.entry.split(":")[0])
    assert module.STAGE == spec.name  # the name the module's manifests are written under
    assert callable(spec.function())
    fields = set(GrlmConfig.model_fields)
    assert set(spec.sections) <= fields and set(spec.tracked) <= fields and spec.sections
    assert spec.help and spec.outputs is not None
    cfg = load_config(None, [])
    assert isinstance(spec.keyed_config(cfg), GrlmConfig)  # its key's config (the stage's own resolution)
    assert spec.progress is None or callable(spec.progress_function())  # `grlm status`'s hook loads


def test_the_graph_is_ordered_acyclic_and_its_verbs_unique():
    assert len({s.verb for s in REGISTRY}) == len(REGISTRY)
    for terms in ("ctg", "provided", "compress"):
        cfg = load_config(None, [f"sft.terms={terms}", "sft.compress_k=64"])
        for s in REGISTRY:
            for up in reads(s.name, cfg):  # a stage reads only stages that come before it
                assert STAGES.index(up) < STAGES.index(s.name), (s.name, up)
    # members runs only under train.members > 1 (run_pipeline leaves it out otherwise)
    assert DEMO_STAGES == ("prepare", "embed", "neighbors", "ctg", "sft", "train", "members", "eval")


def test_a_stage_key_moves_with_its_own_sections_only():
    base = load_config(None, [])
    assert stage_key(base, "eval") != stage_key(load_config(None, ["eval.num_beams=3"]), "eval")
    assert stage_key(base, "ctg") == stage_key(load_config(None, ["eval.num_beams=3"]), "ctg")
    # the embedder initialises the weights only under model.embed_init=embedder
    emb = ["model.embed_init=embedder"]
    assert stage_key(load_config(None, emb), "train") != stage_key(load_config(None, emb + ["embed.batch_size=7"]), "train")
    assert stage_key(base, "train") == stage_key(load_config(None, ["embed.batch_size=7"]), "train")
    assert stage_key(base, "sft", "v9").endswith("-v9")
    assert upstream("eval", base)[-1] == "eval"


def test_the_train_key_hashes_the_precision_it_runs_with_so_a_resubmitted_auto_run_resumes():
    """The train stage resolves train.precision=auto (bf16 where native, else fp32) before it runs and writes
    its key; the key a resubmission is checked against (half-done guard, skip-if-done) must be that same one."""
    from grlm_ray.stages.train import resolved
    from grlm_ray.stages.train.schedule import resolve_precision

    auto = load_config(None, ["train.precision=auto"])
    runs_as = resolve_precision(auto.train)
    assert runs_as in ("bf16", "fp32") and resolved(auto).train.precision == runs_as
    explicit = load_config(None, [f"train.precision={runs_as}"])
    assert stage_key(auto, "train") == stage_key(explicit, "train") == stage_key(resolved(auto), "train")
    other = "fp32" if runs_as == "bf16" else "bf16"
    assert stage_key(auto, "train") != stage_key(load_config(None, [f"train.precision={other}"]), "train")
    assert stage_key(auto, "eval") != stage_key(explicit, "eval")  # downstream keys unchanged: finished evals stay


def test_train_members_leave_the_run_models_key_alone_and_key_each_member_as_its_own_run():
    """Asking for members does not retrain the run's own model (the train key ignores train.members), changes what
    the eval stage decodes (its key moves; it reads the members stage), and member n is keyed exactly as a run of
    the same recipe with seeds + n: a member trained by hand is the same training."""
    from grlm_ray.core.errors import ConfigError
    from grlm_ray.stages.members import member_config

    base, three = load_config(None, []), load_config(None, ["train.members=3"])
    assert stage_key(base, "train") == stage_key(three, "train")
    assert stage_key(base, "eval") != stage_key(three, "eval")
    assert "members" not in upstream("eval", base) and upstream("eval", three)[-2:] == ("members", "eval")
    m2 = member_config(three, 2)
    assert (m2.run.name, m2.model.seed, m2.train.seed, m2.train.members) == (f"{base.run.name}-member2", 2, 2, 1)
    assert stage_key(m2, "train") == stage_key(load_config(None, ["model.seed=2", "train.seed=2"]), "train")
    assert stage_key(m2, "train") != stage_key(member_config(three, 1), "train")
    with pytest.raises(ValueError, match="members 1..2"):
        member_config(three, 3)
    with pytest.raises(ConfigError, match="train.members=2 .* needs eval.backend=transformers"):
        load_config(None, ["train.members=2", "eval.backend=vllm"])


def test_an_unknown_stage_is_a_clear_error():
    from grlm_ray.core.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown stage 'nope'; known: prepare, embed"):
        stage("nope")
