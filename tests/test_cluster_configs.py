"""cluster/, jobs/ and their cross-references: required keys, and every entrypoint, config and override
they name exists and validates."""

import re
import shlex
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _config_args(cmd: str) -> tuple[Path, list[str]]:
    """`python jobs/grlm.py VERB CONFIG k=v ...` -> (entrypoint, [CONFIG, overrides...])."""
    parts = shlex.split(cmd)
    i = next(n for n, p in enumerate(parts) if re.fullmatch(r"jobs/\w+\.py", p))
    return REPO / parts[i], parts[i + 2:]


def _load(args: list[str]):
    from grlm_ray.core.config import load_config

    assert (REPO / args[0]).is_file(), args[0]
    return load_config(REPO / args[0], [a for a in args[1:] if "=" in a])


def test_cluster_launcher_has_cpu_head_and_gpu_workers():
    doc = yaml.safe_load((REPO / "cluster" / "ray-cluster-gpu.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in doc, key
    types = doc["available_node_types"]
    head = types[doc["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu = [t for n, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert gpu and all(t["max_workers"] > t["min_workers"] for t in gpu)  # autoscaled
    assert sum(t["max_workers"] for t in types.values()) <= doc["max_workers"]
    assert any("constraints-gpu.txt" in c for c in doc["setup_commands"])
    assert "AWS_SECRET" not in (REPO / "cluster" / "ray-cluster-gpu.yaml").read_text()


def test_rayjob_entrypoint_and_config_exist_and_validate():
    doc = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob-train.yaml").read_text())
    assert doc["kind"] == "RayJob" and doc["apiVersion"].startswith("ray.io/")
    entry, args = _config_args(doc["spec"]["entrypoint"])
    assert entry.is_file(), entry
    cfg = _load(args)
    assert cfg.train.use_gpu and cfg.train.num_workers == 8
    spec = doc["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"] and any(
        "nvidia.com/gpu" in c["resources"]["limits"]
        for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])


def test_rayservice_names_an_importable_app_and_valid_config():
    import importlib

    doc = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    assert doc["kind"] == "RayService"
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    for app in serve_cfg["applications"]:
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        cfg = _load([app["args"]["config"], *app["args"]["overrides"]])
        assert cfg.serve.backend == "vllm"
        assert {d["name"] for d in app["deployments"]} <= {"Generator", "Grounder", "Ingress"}
    assert doc["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_constraints_pin_the_gpu_stack_together():
    pins = {}
    for line in (REPO / "cluster" / "constraints-gpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"\[.*\]", "", name)] = version
    for pkg in ("ray", "vllm", "torch", "deepspeed", "transformers"):
        assert pkg in pins, pkg
    import ray
    import torch
    import transformers

    # the CPU stack here is the same family (torch's local tag aside)
    assert pins["ray"] == ray.__version__ and pins["transformers"] == transformers.__version__
    assert pins["torch"] == torch.__version__.split("+")[0]


def test_runtime_env_uploads_code_not_data_and_holds_no_secrets():
    doc = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert doc["working_dir"] == "."
    for must in (".git/", ".venv/", "runs/"):
        assert must in doc["excludes"], must
    assert not any(re.search(r"SECRET|(^|_)TOKEN($|_)|PASSWORD|ACCESS_KEY", k) for k in doc.get("env_vars", {}))


def _job_commands() -> list[tuple[Path, str]]:
    """Every `jobs/grlm.py VERB CONFIG ...` written in the repo's docs, configs and cluster files."""
    files = [REPO / "README.md", *(REPO / "cluster").rglob("*.*"), *(REPO / "configs").rglob("*.yaml"),
             *(REPO / "jobs").glob("*.*")]
    out = []
    for f in files:
        for m in re.finditer(r"jobs/grlm\.py ([\w-]+) ((?:configs/)?[\w/.-]+\.yaml)?", f.read_text()):
            out.append((f, m.group(0)))
    return out


def test_the_job_entrypoint_runs_every_cli_verb_and_every_usage_names_real_things():
    """One `ray job submit` entrypoint (jobs/grlm.py) for every verb: the stage registry's and the rest."""
    import subprocess
    import sys

    from grlm_ray.cli import build_parser
    from grlm_ray.core.registry import REGISTRY

    assert sorted(p.name for p in (REPO / "jobs").glob("*.py")) == ["grlm.py"]
    r = subprocess.run([sys.executable, "jobs/grlm.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for s in REGISTRY:
        assert s.verb in r.stdout and s.help in " ".join(r.stdout.split()), s.name
    parser = build_parser()
    uses = _job_commands()
    assert len(uses) >= 10  # README, cluster files, every paper / iift config's usage line
    for where, use in uses:
        parts = use.split()
        verb = parts[1]
        if verb == "VERB":  # the generic usage line
            continue
        assert parser.parse_args([verb, "configs/demo.yaml"]).verb == verb, (where, use)
        if len(parts) > 2 and parts[2].startswith("configs/"):
            assert (REPO / parts[2]).is_file(), (where, use)
