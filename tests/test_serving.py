"""Serving for real: the Ray Serve app (ingress + generator + 2 grounding replicas) on CPU with the tiny
trained model, over HTTP on 127.0.0.1: recommendations, every bad-input case, the admin token, and
catalog updates (CTG for new items; a terms table) served without restarting the generator."""

import json
import urllib.error
import urllib.request

import pytest

from conftest import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TOKEN_ENV = "GRLM_TEST_ADMIN_TOKEN"


@pytest.fixture(scope="module")
def app(tiny_trained_run, monkeypatch_module):
    import secrets

    from ray import serve

    from grlm_ray.config import load_config
    from grlm_ray.serving import start, stop

    token = secrets.token_hex(16)
    monkeypatch_module.setenv(TOKEN_ENV, token)
    cfg = load_config(None, tiny_trained_run + [
        f"serve.port={free_port()}", f"serve.admin_token_env={TOKEN_ENV}", "serve.num_beams=8",
        "serve.max_body_bytes=4096", "serve.generator.max_replicas=1", "serve.generator.num_cpus=0.5",
        "serve.grounder.min_replicas=2", "serve.grounder.max_replicas=2", "serve.grounder.num_cpus=0.1",
        "serve.catalog_update_cpus=0.5"])
    url = start(cfg)
    yield cfg, url, token
    stop(cfg)
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def call(url, method, path, body=None, headers=None, raw=None, content_type="application/json"):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": content_type} if content_type else {}
    h.update(headers or {})
    req = urllib.request.Request(url + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _histories(cfg, n):
    import pyarrow.parquet as pq

    seqs = pq.read_table(f"{cfg.run.root}/{cfg.run.name}/prepare/sequences.parquet").to_pylist()
    return [s["item_ids"][:6] for s in seqs[:n]]


def test_recommends_over_http_with_every_field(app):
    cfg, url, _ = app
    status, health = call(url, "GET", "/healthz")
    assert status == 200 and health["status"] == "ok"
    hist = _histories(cfg, 1)[0]
    status, res = call(url, "POST", "/v1/recommend", {"history": hist, "k": 7})
    assert status == 200, res
    assert len(res["items"]) == 7 and len({i["item_id"] for i in res["items"]}) == 7
    assert res["constrained"] and 1 <= len(res["beams"]) <= 8
    assert all(b["log_prob"] <= 0 and b["tid"] for b in res["beams"])
    assert len({b["tid"] for b in res["beams"]}) == len(res["beams"])  # distinct TIDs
    for n, item in enumerate(res["items"]):
        assert {"item_id", "tid", "title", "grounded_by", "rank", "beam_rank", "log_prob",
                "grounding_score"} <= set(item) and item["rank"] == n + 1
        assert item["grounded_by"] in ("direct", "structural", "fill")
        if item["grounded_by"] == "fill":
            assert item["beam_rank"] is None and item["log_prob"] is None
            continue
        beam = res["beams"][item["beam_rank"] - 1]
        assert item["log_prob"] == beam["log_prob"] and item["grounding_score"] >= 0
        if item["grounded_by"] == "direct":
            assert item["tid"] == beam["tid"]
    status, got = call(url, "GET", f"/v1/items/{res['items'][0]['item_id']}")
    assert status == 200 and got["tid"] == res["items"][0]["tid"]
    # raw TIDs as the history give the same answer as the items they name
    status, by_tid = call(url, "POST", "/v1/recommend",
                          {"tids": [call(url, "GET", f"/v1/items/{i}")[1]["tid"] for i in hist], "k": 7})
    assert status == 200 and [i["item_id"] for i in by_tid["items"]] == [i["item_id"] for i in res["items"]]
    status, schema = call(url, "GET", "/openapi.json")
    assert status == 200 and "/v1/recommend" in schema["paths"]


def test_bad_input_gets_clear_errors(app):
    cfg, url, _ = app
    hist = _histories(cfg, 1)[0]
    status, res = call(url, "POST", "/v1/recommend", {"history": hist[:2] + ["no-such-item", "nor-this"]})
    assert status == 422 and res["unknown"] == ["no-such-item", "nor-this"] and "no-such-item" in res["error"]
    status, res = call(url, "POST", "/v1/recommend", {"history": [], "k": 4})  # documented: popularity
    assert status == 200 and res["fallback"].startswith("popularity") and len(res["items"]) == 4
    assert all(i["grounded_by"] == "popularity" for i in res["items"])
    long = (hist * 10)[:cfg.sft.max_history + 5]
    status, res = call(url, "POST", "/v1/recommend", {"history": long, "k": 3})
    assert status == 200 and res["history_truncated"] and res["history_used"] == cfg.sft.max_history
    for k in (0, 101, -1):
        status, res = call(url, "POST", "/v1/recommend", {"history": hist, "k": k})
        assert status == 422 and "k must be between 1 and 100" in res["error"]
    status, res = call(url, "POST", "/v1/recommend", {"history": hist, "num_beams": 99})
    assert status == 422 and "num_beams" in res["error"]
    status, res = call(url, "POST", "/v1/recommend", {"history": hist, "colour": "red"})
    assert status == 422 and res["details"][0]["loc"] == ["colour"]
    status, res = call(url, "POST", "/v1/recommend", {"history": "abc"})
    assert status == 422 and res["details"][0]["loc"] == ["history"]
    status, res = call(url, "POST", "/v1/recommend", raw=b'{"history": [')
    assert status == 400 and "malformed JSON" in res["error"]
    status, res = call(url, "POST", "/v1/recommend", raw=b"history=1", content_type="application/x-www-form-urlencoded")
    assert status == 415
    status, res = call(url, "POST", "/v1/recommend", {"history": ["x" * 100] * 60})
    assert status == 413 and "4096" in res["error"]
    status, res = call(url, "GET", "/v1/items/no-such-item")
    assert status == 404 and res["unknown"] == ["no-such-item"]


def test_admin_calls_need_the_token(app):
    _, url, token = app
    body = {"items": [{"item_id": "x-1", "title": "A thing"}]}
    assert call(url, "POST", "/v1/admin/items", body)[0] == 401
    assert call(url, "POST", "/v1/admin/items", body, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert call(url, "POST", "/v1/admin/reload", {"items_path": "/nope"}, headers={"Authorization": token})[0] == 401
    status, res = call(url, "POST", "/v1/admin/items", {"items": [{"item_id": "", "title": "t"}]},
                       headers={"Authorization": f"Bearer {token}"})
    assert status == 422 and "item 0" in res["error"] and "item_id" in res["error"]


def test_catalog_updates_are_served_without_restarting_the_generator(app, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg, url, token = app
    auth = {"Authorization": f"Bearer {token}"}
    hist = _histories(cfg, 1)[0]
    status, before = call(url, "POST", "/v1/recommend", {"history": hist, "k": 10, "constrained": False})
    assert status == 200
    replica = before["generator_replica"]
    version = before["catalog_version"]
    # 1) new items described by their metadata get their TIDs through CTG (the run's LLM, neighbours)
    new = {"item_id": "new-ctg-1", "title": "Glowra Vegan Lipstick for Women - Model 901",
           "description": "A long-lasting matte vegan lipstick.", "brand": "Glowra", "category": "Beauty",
           "categories": ["Beauty", "Lipstick"]}
    status, res = call(url, "POST", "/v1/admin/items", {"items": [new]}, headers=auth)
    assert status == 200, res
    assert res["version"] == version + 1 and res["items"][0]["source"].startswith("llm")
    tid = res["items"][0]["tid"]
    assert len(tid.split()) == cfg.ctg.num_terms
    for _ in range(6):  # both grounding replicas know it
        status, got = call(url, "GET", "/v1/items/new-ctg-1")
        assert status == 200 and got["tid"] == tid and got["added_after_training"]
    status, res = call(url, "POST", "/v1/recommend", {"history": hist + ["new-ctg-1"], "k": 5})
    assert status == 200 and res["catalog_version"] == version + 1
    # an item id that exists already is refused
    status, res = call(url, "POST", "/v1/admin/items", {"items": [new]}, headers=auth)
    assert status == 422 and "already exists" in res["error"]
    # 2) a terms table: give a TID the model writes for this user but no item had, to a new item
    live = {" ".join(t) for t in pq.read_table(f"{cfg.run.root}/{cfg.run.name}/sft/terms.parquet")
            .column("terms").to_pylist()} | {tid}
    # unconstrained, the tiny model writes TIDs no item has (sometimes one long "word" such as a run of digits
    # from the demo titles' model numbers: still a TID the grounder can be given)
    unknown = [b["tid"] for b in before["beams"] if b["tid"] and b["tid"] not in live]
    assert unknown, before["beams"]
    table = pa.Table.from_pylist([{"item_id": "new-tab-1", "title": "A brand new item", "description": "",
                                   "brand": "", "category": "Beauty", "categories": [],
                                   "terms": unknown[0].split()}])
    pq.write_table(table, tmp_path / "new.parquet")
    status, res = call(url, "POST", "/v1/admin/reload", {"items_path": str(tmp_path / "new.parquet")}, headers=auth)
    assert status == 200 and res["items"][0]["tid"] == unknown[0].lower(), res
    status, after = call(url, "POST", "/v1/recommend", {"history": hist, "k": 10, "constrained": False})
    assert status == 200 and after["catalog_version"] == version + 2
    assert after["beams"] == before["beams"]  # same model, same history
    hit = [i for i in after["items"] if i["item_id"] == "new-tab-1"]
    assert hit and hit[0]["grounded_by"] == "direct" and hit[0]["added_after_training"]
    assert after["generator_replica"] == replica  # no generator restart
    # constrained decoding now may write it too: the generator's trie has it
    status, con = call(url, "POST", "/v1/recommend", {"history": hist, "k": 10})
    assert status == 200 and con["catalog_version"] == version + 2
    # updates are saved with the run
    saved = pq.read_table(f"{cfg.run.root}/{cfg.run.name}/serve/catalog_updates.parquet").to_pylist()
    assert [r["item_id"] for r in saved] == ["new-ctg-1", "new-tab-1"]
