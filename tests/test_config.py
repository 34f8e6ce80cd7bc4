from pathlib import Path

import pytest

from grlm_ray.config import GrlmConfig, load_config, apply_overrides
from grlm_ray.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_yaml_loads_and_opens_with_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, GrlmConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name} must open with a comment giving its command"
    assert "grlm " in path.read_text().split("\nrun:")[0]


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
