from pathlib import Path

import pytest

from grlm_ray.core.config import GrlmConfig, load_config, apply_overrides
from grlm_ray.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_yaml_loads_and_opens_with_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, GrlmConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name} must open with a comment giving its command"
    head = path.read_text().split("\nrun:")[0].split("\nextends:")[0]
    assert "grlm " in head or "jobs/" in head


def test_unknown_keys_are_errors_and_name_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run:\n  name: x\n  nmae: typo\n")
    with pytest.raises(ConfigError, match=r"run\.nmae"):
        load_config(p)


def test_overrides_are_typed_and_dotted():
    cfg = load_config(None, ["data.domains.demo.num_items=123", "ray.num_cpus=1", "run.resume=false"])
    assert cfg.data.domains["demo"].num_items == 123
    assert cfg.ray.num_cpus == 1 and cfg.run.resume is False
    with pytest.raises(ConfigError, match="num_items"):
        load_config(None, ["data.domains.demo.num_items=many"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["novalue"])


def test_mode_and_domain_count_are_cross_checked():
    with pytest.raises(ConfigError, match="cross_domain' takes exactly two"):
        load_config(None, ["data.mode=cross_domain"])
    with pytest.raises(ConfigError, match="joint' merges two or more"):
        load_config(None, ["data.mode=joint"])


def test_config_is_frozen_and_hash_tracks_section():
    a = load_config(None)
    b = load_config(None, ["ray.num_cpus=1"])
    c = load_config(None, ["data.k_core=3"])
    assert a.section_hash("data") == b.section_hash("data") != c.section_hash("data")
    with pytest.raises(Exception):
        a.run.name = "other"  # type: ignore[misc]


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["data.domains.demo.seed=7"])
    p = tmp_path / "resolved.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p) == cfg


def test_no_secret_fields_in_config():
    dumped = load_config(None, ["run.root=s3://b/p", "run.s3.endpoint_url=http://127.0.0.1:1"]).to_yaml().lower()
    assert "secret" not in dumped and "access_key" not in dumped


def test_iift_presets_carry_the_paper_recipe_and_scale_learning_rate_with_size():
    root = Path(__file__).resolve().parents[1] / "configs" / "iift"
    lrs = {}
    for size in ("0.6b", "1.7b", "4b", "8b", "14b"):
        cfg = load_config(root / f"qwen3-{size}.yaml")
        t = cfg.train
        assert cfg.model.init == "pretrained" and size.replace("b", "") in cfg.model.path.lower().replace("b-", "-")
        assert (t.global_batch, t.epochs, t.precision, t.strategy) == (128, 3.0, "bf16", "deepspeed")
        assert cfg.data.domains["beauty"].kind == "bundle" and not cfg.model.enable_thinking
        lrs[size] = t.learning_rate
    assert lrs["4b"] == 1e-4
    assert list(lrs.values()) == sorted(lrs.values(), reverse=True)


def test_extends_merges_deeply_and_rejects_loops(tmp_path):
    (tmp_path / "base.yaml").write_text("run:\n  name: a\n  root: r\ntrain:\n  epochs: 2\n  micro_batch: 4\n")
    (tmp_path / "top.yaml").write_text("extends: base.yaml\ntrain:\n  epochs: 5\n")
    cfg = load_config(tmp_path / "top.yaml")
    assert (cfg.run.name, cfg.train.epochs, cfg.train.micro_batch) == ("a", 5.0, 4)
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "loop.yaml")


def test_paper_presets_and_ablations_change_only_what_they_name():
    from grlm_ray.core.config import load_config

    base = Path(__file__).resolve().parents[1] / "configs"
    beauty = load_config(base / "paper" / "beauty.yaml")
    assert beauty.model.path.endswith("Qwen3-4B-Instruct-2507") and beauty.embed.model.endswith("Qwen3-Embedding-8B")
    assert beauty.ctg.llm.model.endswith("Qwen3-4B-Instruct-2507") and list(beauty.data.domains) == ["beauty"]
    for name, domains in (("sports", ["sports"]), ("toys", ["toys"]), ("cross_sports_clothing", ["sports", "clothing"]),
                          ("cross_phones_electronics", ["phones", "electronics"])):
        cfg = load_config(base / "paper" / f"{name}.yaml")
        assert list(cfg.data.domains) == domains and cfg.model.path == beauty.model.path
    assert len(load_config(base / "paper" / "joint10.yaml").data.domains) == 10
    expected = {"tid7": ("ctg", "num_terms", 7), "tid10": ("ctg", "num_terms", 10),
                "wo_ctg": ("ctg", "context", "none"), "wo_gti": ("sft", "gti_weight", 0.0)}
    for name, (section, field, value) in expected.items():
        cfg = load_config(base / "paper" / "ablations" / f"{name}.yaml")
        assert getattr(getattr(cfg, section), field) == value
        diff = {s for s in type(cfg).model_fields if s != "run" and getattr(cfg, s) != getattr(beauty, s)}
        assert diff == {section}, (name, diff)


def test_extends_accepts_a_list_later_files_win(tmp_path):
    from grlm_ray.core.config import load_config

    (tmp_path / "a.yaml").write_text("run: {name: a}\neval: {num_beams: 4}\n")
    (tmp_path / "b.yaml").write_text("run: {name: b}\n")
    (tmp_path / "c.yaml").write_text("extends: [a.yaml, b.yaml]\neval: {limit_users: 7}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.run.name, cfg.eval.num_beams, cfg.eval.limit_users) == ("b", 4, 7)


def test_fault_injection_is_read_from_the_environment_only():
    from grlm_ray.core import faults
    from grlm_ray.core.config import TrainConfig

    assert faults.spec({}) == {} and faults.spec({"GRLM_FAULTS": " train_step@5 "}) == {"train_step": 5}
    assert faults.due({"train_step": 5}, "train_step", 5) and not faults.due({}, "train_step", 5)
    for bad in ("train_step", "train_step@x", "nowhere@3"):
        with pytest.raises(ValueError, match="GRLM_FAULTS"):
            faults.spec({"GRLM_FAULTS": bad})
    assert "fail_at_step" not in TrainConfig.model_fields  # no test hook in a production config


def test_object_store_is_sized_from_the_data_within_bounds():
    import os

    from grlm_ray.core.config import RayConfig
    from grlm_ray.core.runtime import object_store_bytes

    cfg = RayConfig(object_store_memory_mb=512)
    assert object_store_bytes(cfg) == 512 * 2**20  # nothing said: the configured floor
    assert object_store_bytes(cfg, 10 * 2**20) == 512 * 2**20  # small data: the floor
    assert object_store_bytes(cfg, 1536 * 2**20) == int(2.5 * 1536 * 2**20)  # 1M x 384 float32: sized from it
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert object_store_bytes(cfg, 10**13) == int(0.4 * total)  # never past 40% of the machine


def test_admission_limit_follows_the_generators_capacity_unless_set():
    cfg = load_config(None, ["serve.generator.max_replicas=3", "serve.generator.max_ongoing_requests=4"])
    assert cfg.serve.admitted() == 12  # 3 replicas x 4 at once, one ingress replica
    two = load_config(None, ["serve.generator.max_replicas=3", "serve.generator.max_ongoing_requests=4",
                             "serve.ingress.min_replicas=2"])
    assert two.serve.admitted() == 6  # shared by the ingress replicas
    assert load_config(None, ["serve.admission_limit=5"]).serve.admitted() == 5
    assert load_config(None, ["serve.admission_limit=-1"]).serve.admitted() is None
    with pytest.raises(Exception, match="admission_limit"):
        load_config(None, ["serve.admission_limit=-2"])


def test_byo_recipe_is_the_benchmarked_recipe_on_your_own_data():
    """configs/byo_recipe.yaml trains exactly what the Beauty quality benchmark trains (model, training, SFT,
    TID writer, evaluation), on the byo source: the recipe cannot drift from the measured one."""
    byo = load_config(REPO / "configs" / "byo_recipe.yaml")
    bench = load_config(REPO / "configs" / "bench" / "beauty_quality.yaml")
    assert next(iter(byo.data.domains.values())).kind == "byo"
    for section in ("model", "train", "sft", "ctg", "eval", "baseline"):
        assert getattr(byo, section) == getattr(bench, section), section
    # and the best recipe (three seeds as one) likewise
    best, bench_best = (load_config(REPO / "configs" / p) for p in ("byo_recipe_best.yaml", "bench/beauty_quality_best.yaml"))
    assert best.train.members == 3 and best.model.hidden_size == 192
    for section in ("model", "train", "sft", "ctg", "eval", "baseline"):
        assert getattr(best, section) == getattr(bench_best, section), section


def test_a_job_joining_a_cluster_hands_its_workers_that_clusters_address(monkeypatch):
    """Workers resolve the cluster for Ray Train's placement-group cleaner from RAY_ADDRESS; without it they ask
    the head `ray start` last recorded on the machine (not necessarily theirs)."""
    import json

    from grlm_ray.core.runtime import _with_cluster_address

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what `ray job submit` gives a job's driver
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    base = {"env_vars": {"HF_HUB_OFFLINE": "1"}}
    assert _with_cluster_address(base, "auto") == {"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "127.0.0.1:6379"}}
    assert base == {"env_vars": {"HF_HUB_OFFLINE": "1"}}  # the caller's dict is not changed
    assert _with_cluster_address(None, "10.0.0.5:6379") == {"env_vars": {"RAY_ADDRESS": "10.0.0.5:6379"}}
    assert _with_cluster_address(base, "ray://head:10001") is base  # Ray Client: the server side resolves it
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"env_vars": {"RAY_ADDRESS": "10.0.0.9:6379"}}}))
    assert _with_cluster_address(base, "auto") is base  # the job's own runtime env sets it: Ray would refuse a clash
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert _with_cluster_address(base, "auto") is base  # nothing known before ray.init: unchanged


def test_a_neutral_field_of_a_domain_leaves_the_data_key_as_it_was():
    """``neutral_default`` fields inside ``data.domains`` (a dict of source models) are left out of stage keys at
    their default, as everywhere else: adding ``description`` to bundles did not redo finished bundle runs; set, it
    counts."""
    from grlm_ray.core.config import _key_dump

    doms = "data.domains={beauty: {kind: bundle, dir: beauty}}"
    plain = load_config(None, [doms])
    dumped = _key_dump(plain.data)["domains"]["beauty"]
    assert dumped == {"kind": "bundle", "dir": "beauty", "with_terms": True, "refilter": False}
    described = load_config(None, ["data.domains={beauty: {kind: bundle, dir: beauty, description: lexid}}"])
    assert _key_dump(described.data)["domains"]["beauty"]["description"] == "lexid"
    assert described.section_hash("data") != plain.section_hash("data")
