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
