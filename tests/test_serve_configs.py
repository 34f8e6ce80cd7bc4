"""serve/*.yaml: the Serve configs name an importable app builder, a grlm config that loads with their
overrides, and only deployments the application has."""

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SERVE_FILES = sorted((REPO / "serve").glob("*.yaml"))


def test_there_are_serve_configs():
    assert {p.name for p in SERVE_FILES} >= {"demo.yaml", "gpu_vllm.yaml"}


@pytest.mark.parametrize("path", SERVE_FILES, ids=lambda p: p.name)
def test_serve_config_is_consistent(path):
    import importlib

    from grlm_ray.core.config import load_config

    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load(path.read_text())
    assert doc["http_options"]["port"] and doc["applications"]
    from ray.serve.schema import DeploymentSchema

    ServeDeploySchema.model_validate(doc)  # Serve's own schema: option values
    for app in doc["applications"]:  # ... and names (the schema lets unknown keys through)
        for d in app.get("deployments", []):
            assert set(d) <= set(DeploymentSchema.model_fields), set(d) - set(DeploymentSchema.model_fields)
    for app in doc["applications"]:
        module, attr = app["import_path"].split(":")
        mod = importlib.import_module(module)
        assert callable(getattr(mod, attr))
        cfg_path = REPO / app["args"]["config"]
        assert cfg_path.is_file(), cfg_path
        cfg = load_config(cfg_path, app["args"].get("overrides", []))
        assert cfg.serve.host == "127.0.0.1" or doc["http_options"]["host"] != "127.0.0.1"
        names = {d["name"] for d in app.get("deployments", [])}
        assert names <= {"Generator", "Grounder", "TermWriter", "Ingress"}, names
        for d in app.get("deployments", []):
            auto = d.get("autoscaling_config", {})
            assert auto.get("min_replicas", 0) <= auto.get("max_replicas", 1)


def test_a_generator_in_its_own_python_gets_a_runtime_env_and_bad_settings_are_named(tmp_path, monkeypatch):
    """serve.generator.python / env_vars become the replicas' Ray runtime_env (an absolute py_executable);
    a Python that is not there, or the vLLM backend where the replicas' Python has no vllm, is refused
    before anything is deployed, naming the field."""
    import importlib.util

    from grlm_ray.core.config import load_config
    from grlm_ray.core.errors import ConfigError
    from grlm_ray.serving.app import generator_checks

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["serve.generator.python=venv/bin/python", "serve.generator.env_vars.VLLM_CPU_KVCACHE_SPACE=1"])
    opts = cfg.serve.generator.deployment_options()["ray_actor_options"]
    assert opts["runtime_env"] == {"py_executable": str(tmp_path / "venv/bin/python"),
                                   "env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}}
    assert "runtime_env" not in cfg.serve.grounder.deployment_options()["ray_actor_options"]
    (msg,) = generator_checks(cfg)
    assert "serve.generator.python 'venv/bin/python' is not an executable" in msg
    exe = tmp_path / "venv/bin/python"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert generator_checks(cfg) == []
    vllm_here = load_config(None, ["serve.backend=vllm"])
    if importlib.util.find_spec("vllm") is None:  # the test environment: vllm lives in .venv-vllm
        (msg,) = generator_checks(vllm_here)
        assert "serve.backend=vllm" in msg and "serve.generator.python" in msg
    assert vllm_here.serve.scores_renormalized() and not load_config(None, []).serve.scores_renormalized()
    with pytest.raises(ConfigError, match="serve.renormalize=false needs the transformers backend"):
        load_config(None, ["serve.backend=vllm", "serve.renormalize=false"])


def test_text_neighbour_placement_without_the_runs_embeddings_is_refused_before_deploying(tmp_path):
    from grlm_ray.core.config import load_config
    from grlm_ray.serving.app import grounder_checks

    base = [f"run.root={tmp_path}", "run.name=r"]
    assert grounder_checks(load_config(None, base)) == []  # nothing placed: nothing needed
    (msg,) = grounder_checks(load_config(None, base + ["serve.content_fill=2"]))
    assert "serve.content_fill" in msg and str(tmp_path / "r" / "embed" / "embeddings.parquet") in msg
    (msg,) = grounder_checks(load_config(None, base + ["serve.added_neighbours=1"]))
    assert "serve.added_neighbours" in msg
    (tmp_path / "r" / "embed").mkdir(parents=True)
    (tmp_path / "r" / "embed" / "embeddings.parquet").write_bytes(b"")
    assert grounder_checks(load_config(None, base + ["serve.content_fill=2"])) == []
