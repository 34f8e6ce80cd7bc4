"""Serving load test, overload level and fault runs (loopback only; bounded request count and duration).

    grlm demo          # a trained demo run (runs/demo)
    grlm bench serve-load --root runs
    grlm bench serve-load --config configs/bench/beauty_quality.yaml --root /tmp/runs --set run.name=exp-r6 \
        --tag beauty                                   # a model trained on Beauty (12k items)

Starts the Serve app of --config on 127.0.0.1 with two generator and two grounding replicas; the generator
takes ``--sustainable`` requests at once (half per replica), so does the one ingress replica
(``serve.admission_limit`` by default), past which requests are refused with 503 + Retry-After at the door
(the generator's own queue, as many more, is the second bound). Then:
1. load levels: for each concurrency, up to --requests POST /v1/recommend (histories of seeded test users)
   within --duration seconds: p50/p99 latency, throughput, errors;
2. overload: --overload-factor x --sustainable clients for --fault-duration seconds: statuses, p99 of the
   accepted requests vs the sustainable level's p99, how fast the 503s come back, timeouts;
3. fault runs, each at --concurrency-fault clients for --fault-duration seconds with one kill --kill-after
   seconds in: a generator replica, a grounding replica, the catalog registry actor (killed for good; the
   app re-creates it from the run's saved updates). Failed requests (0 is the goal: the ingress retries
   idempotent calls), retries made, the catalog version before / after, time until Serve had replaced the
   replica;
4. catalog updates: --updates new items added one at a time through the admin API (the term writer starts
   with 0 replicas, so the first call loads its models: cold; the others warm), each timed until a recommend
   call with it in the history is answered. The run's saved catalog updates are restored afterwards.
Writes benchmarks/results/serve_load[_TAG].json with the machine description and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from grlm_ray.bench.common import REPO

TOKEN_ENV = "GRLM_BENCH_ADMIN_TOKEN"


def post(url: str, body: dict, timeout: float = 120, path: str = "/v1/recommend",
         headers: dict[str, str] | None = None) -> tuple[int, float, dict | None]:
    """(status, seconds, JSON body); status 0 = no HTTP answer (connection error or client timeout)."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = json.loads(r.read())
            return r.status, time.perf_counter() - t, out
    except urllib.error.HTTPError as e:
        try:
            out = json.loads(e.read() or b"{}")
        except ValueError:
            out = None
        return e.code, time.perf_counter() - t, dict(out or {}, retry_after=e.headers.get("Retry-After"))
    except Exception:  # noqa: BLE001 - a dropped connection or a timeout counts as a failed request
        return 0, time.perf_counter() - t, None


def _pct(x: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(x, q)), 1) if len(x) else None


def load(url: str, histories: list[list[str]], concurrency: int, n: int, duration: float, k: int,
         timeout: float = 120) -> dict[str, Any]:
    """``concurrency`` closed-loop clients, at most ``n`` requests within ``duration`` seconds. A client told
    503 + Retry-After waits that long before its next request, as a well-behaved client does."""
    deadline = time.time() + duration
    counter = iter(range(n))
    lock = threading.Lock()
    events: list[tuple[float, int, float, dict | None]] = []  # (start time, status, latency, body)

    def worker() -> None:
        while time.time() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.time()
            status, lat, body = post(url, {"history": histories[i % len(histories)], "k": k}, timeout)
            with lock:
                events.append((start, status, lat, body))
            if status == 503 and body and body.get("retry_after"):
                time.sleep(min(float(body["retry_after"]), max(0.0, deadline - time.time())))

    t0 = time.time()
    with ThreadPoolExecutor(concurrency) as ex:
        for _ in range(concurrency):
            ex.submit(worker)
    wall = time.time() - t0
    ok = np.asarray([lat for _, s, lat, _ in events if s == 200]) * 1000
    shed = np.asarray([lat for _, s, lat, b in events if s == 503 and b and "overloaded" in str(b.get("error"))]) * 1000
    statuses: dict[str, int] = {}
    for _, s, _, _ in events:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    return {"concurrency": concurrency, "requests": len(events), "ok": len(ok),
            "errors": sum(1 for _, s, _, _ in events if s != 200), "statuses": statuses,
            "shed_503": len(shed), "timeouts": statuses.get("0", 0),
            "seconds": round(wall, 2), "throughput_rps": round(len(ok) / wall, 3) if wall else None,
            "p50_ms": _pct(ok, 50), "p99_ms": _pct(ok, 99), "mean_ms": round(float(ok.mean()), 1) if len(ok) else None,
            "p99_503_ms": _pct(shed, 99),
            "retries": sum(int((b or {}).get("retries") or 0) for _, s, _, b in events if s == 200),
            "errors_seen": sorted({f"{s}: {str((b or {}).get('error'))[:160]}" for _, s, _, b in events if s != 200})[:5],
            "_events": events}


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None:
        return 0
    d = st.deployments.get(deployment)
    return int(d.replica_states.get("RUNNING", 0)) if d is not None else 0


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="a run with a trained model")
    ap.add_argument("--root", default="runs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=200, help="per load level")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per load level at most")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--sustainable", type=int, default=4,
                    help="requests the generator takes at once (the throughput knee of the demo model here)")
    ap.add_argument("--overload-factor", type=int, default=4)
    ap.add_argument("--concurrency-fault", type=int, default=4)
    ap.add_argument("--fault-duration", type=float, default=40.0)
    ap.add_argument("--kill-after", type=float, default=8.0)
    ap.add_argument("--faults", default="generator,grounder,registry")
    ap.add_argument("--updates", type=int, default=4, help="items added one by one (the first cold); a cold-start "
                    "run (data.holdout) adds its real held-out items")
    ap.add_argument("--buyers", type=int, default=20, help="a held-out item's buyers asked for a top k, at most")


def _fault_run(cfg: Any, url: str, histories: list[list[str]], what: str, args: argparse.Namespace) -> dict[str, Any]:
    """Kill one ``what`` (a generator / grounder replica, or the registry) under load; count failures."""
    import ray

    from grlm_ray.serving.app import REGISTRY_NAMESPACE, registry_name, replica_names

    app = cfg.serve.app_name
    version_before = post(url, {"history": histories[0], "k": args.k})[2]["catalog_version"]
    result: dict[str, Any] = {}
    dep = {"generator": "Generator", "grounder": "Grounder"}.get(what)
    before = replica_names(app, dep) if dep else []
    want = len(before)

    def killer() -> None:
        time.sleep(args.kill_after)
        result["kill_time"] = time.time()
        if dep is None:
            result["killed"] = registry_name(cfg)
            ray.kill(ray.get_actor(registry_name(cfg), namespace=REGISTRY_NAMESPACE), no_restart=True)
            return
        result["killed"] = before[0]
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        deadline = time.time() + args.fault_duration + 60
        while time.time() < deadline:  # until Serve has replaced it
            alive = replica_names(app, dep)
            if running_replicas(app, dep) >= want and before[0] not in alive and len(alive) >= want:
                result["replaced_s"] = round(time.time() - result["kill_time"], 2)
                return
            time.sleep(0.25)

    th = threading.Thread(target=killer)
    th.start()
    r = load(url, histories, args.concurrency_fault, 100_000, args.fault_duration, args.k)
    th.join()
    events = r.pop("_events")
    kt = result["kill_time"]
    fails = [(s - kt, s + lat - kt) for s, st, lat, _ in events if st != 200]
    after = [b["catalog_version"] for s, st, _, b in events if st == 200 and s > kt]
    r.update({"killed": what, "actor": result["killed"], "kill_after_s": args.kill_after,
              "failed_requests": len(fails), "failed_in_flight_at_kill": sum(1 for a, b in fails if a < 0 <= b),
              "retried_requests": sum(1 for _, st, _, b in events if st == 200 and (b or {}).get("retries")),
              "catalog_version_before": version_before,
              "catalog_versions_after": sorted(set(after)),
              "replaced_s": result.get("replaced_s") if dep else None})
    print(f"fault run ({what}): killed {result['killed']} at +{args.kill_after}s; {r['requests']} requests, "
          f"{r['failed_requests']} failed, {r['retries']} retries; catalog version {version_before} -> "
          f"{r['catalog_versions_after']}; " + (f"replaced after {r['replaced_s']}s" if r["replaced_s"] is not None
                                                else "the registry is recreated by the next call that needs it"),
          flush=True)
    return r


def held_out_updates(run: Any, n: int, max_buyers: int) -> list[tuple[dict[str, Any], list[list[str]]]]:
    """For a cold-start run (``data.holdout``): its ``n`` held-out items with text that are the next purchase
    of the most test users (ties by item id), each with those users' histories (at most ``max_buyers``); []
    for any other run."""
    from grlm_ray.core.schemas import ITEMS, SEQUENCES, TARGETS
    from grlm_ray.serving.catalog import ITEM_FIELDS

    if not run.exists("prepare", "holdout_items.parquet"):
        return []
    held = {r["item_id"]: r for r in run.read_table("prepare", "holdout_items.parquet", ITEMS).to_pylist()
            if (r["title"] or "").strip() or (r["description"] or "").strip()}
    seqs = run.read_table("prepare", "sequences.parquet", SEQUENCES)
    by_user = dict(zip(seqs.column("user_id").to_pylist(), seqs.column("item_ids").to_pylist()))
    buyers: dict[str, list[list[str]]] = {}
    for r in run.read_table("prepare", "targets.parquet", TARGETS).to_pylist():
        if r["split"] == "test" and r["target_item_id"] in held:
            buyers.setdefault(r["target_item_id"], []).append(by_user[r["user_id"]][: r["position"]])
    top = sorted(buyers, key=lambda i: (-len(buyers[i]), i))[:n]
    return [({k: held[i].get(k) or ([] if k == "categories" else "") for k in ITEM_FIELDS}, buyers[i][:max_buyers])
            for i in top]


def _catalog_updates(url: str, token: str, histories: list[list[str]], n: int, k: int,
                     held_out: list[tuple[dict[str, Any], list[list[str]]]] = ()) -> list[dict[str, Any]]:
    """Add ``n`` new items one at a time (the term writer starts with 0 replicas: the first is cold): for each,
    the admin call's time and the time until a recommend call with the item in its history is answered
    (every replica then serves the new catalog version) = the time until the item is recommendable. With
    ``held_out`` (a cold-start run's real held-out items and the histories of the test users whose next
    purchase each is), those items are added and each of their buyers asks for a top ``k``: how often the new
    item is in it (``buyers_hit``)."""
    rows = []
    for i in range(n):
        buyers: list[list[str]] = []
        if i < len(held_out):
            item, buyers = held_out[i]
        else:
            item = {"item_id": f"bench-new-{i}-{int(time.time())}", "category": "Beauty", "brand": "Glowra",
                    "title": ["Glowra Vegan Matte Lipstick, Ruby Red", "Argan Oil Repair Shampoo for Dry Hair, 12 oz",
                              "Lighted Travel Makeup Mirror, 10x Magnifying", "Waterproof Volumizing Mascara, Black",
                              "Unscented Aloe Body Lotion for Sensitive Skin, 16 oz",
                              "Ceramic Flat Iron Hair Straightener, 1 inch"][i % 6],
                    "description": "A new product added while serving.", "categories": ["Beauty"]}
        t0 = time.perf_counter()
        status, _, res = post(url, {"items": [item]}, timeout=600, path="/v1/admin/items",
                              headers={"Authorization": f"Bearer {token}"})
        t_admin = time.perf_counter() - t0
        if status != 200:
            raise RuntimeError(f"admin items answered {status}: {res}")
        st, _, out = post(url, {"history": histories[i][-5:] + [item["item_id"]], "k": k})
        t_total = time.perf_counter() - t0
        hits = 0
        for h in buyers:  # the users whose next purchase this item is, with their histories as of then
            sb, _, rec = post(url, {"history": h, "k": k})
            if sb != 200:
                raise RuntimeError(f"recommend for a buyer of {item['item_id']} answered {sb}: {rec}")
            hits += item["item_id"] in [x["item_id"] for x in rec["items"]]
        rows.append({"item": i + 1, "cold": i == 0, "item_id": item["item_id"], "title": item["title"][:60],
                     "tid": res["items"][0]["tid"], "source": res["items"][0]["source"],
                     "admin_s": round(t_admin, 3), "term_writer_s": res["term_writer"]["seconds"],
                     "writer_load_s": res["term_writer"]["load_seconds"], "recommendable_s": round(t_total, 3),
                     "recommend_status": st, "catalog_version": (out or {}).get("catalog_version"),
                     "buyers": len(buyers), "buyers_hit": hits if buyers else None})
        print(f"catalog update {i + 1} ({'cold' if i == 0 else 'warm'}): {res['items'][0]['source']} TID "
              f"{res['items'][0]['tid']!r}; admin {t_admin:.2f}s, recommendable after {t_total:.2f}s", flush=True)
    return rows


def _buyers_summary(rows: list[dict[str, Any]], k: int) -> dict[str, Any] | None:
    """Of the held-out items' buyers asked, how many found the new item in their top k."""
    asked = [r for r in rows if r.get("buyers")]
    if not asked:
        return None
    users, hits = sum(r["buyers"] for r in asked), sum(r["buyers_hit"] for r in asked)
    return {"items": len(asked), "buyers": users, "buyers_hit": hits, f"hit_rate_at_{k}": round(hits / users, 4)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from grlm_ray.core.config import load_config
    from grlm_ray.core.runtime import free_port
    from grlm_ray.core.schemas import SEQUENCES, TARGETS
    from grlm_ray.core.run import Run
    from grlm_ray.serving.app import start, stop

    half = max(1, math.ceil(args.sustainable / 2))
    cfg = load_config(args.config, [f"run.root={args.root}", "ray.progress_bars=false",
                                    f"serve.port={free_port()}", f"serve.num_beams={args.beams}",
                                    "serve.generator.min_replicas=2", "serve.generator.max_replicas=2",
                                    "serve.generator.num_cpus=0.5", f"serve.generator.max_ongoing_requests={half}",
                                    # the door sheds past --sustainable; the generator queue, the second
                                    # bound, holds them all while a killed replica is replaced
                                    f"serve.generator.max_queued_requests={args.sustainable}",
                                    "serve.grounder.min_replicas=2", "serve.grounder.max_replicas=2",
                                    "serve.grounder.num_cpus=0.1", "serve.term_writer.min_replicas=0",
                                    # one ingress replica: the door's admission bound is per replica
                                    "serve.ingress.min_replicas=1", "serve.ingress.max_replicas=1",
                                    # an update is rare and bursty: its writer may use both cores while it runs
                                    "serve.term_writer.num_cpus=0.25", "serve.term_writer_threads=2",
                                    f"serve.admin_token_env={TOKEN_ENV}", *args.set])  # --set wins
    run = Run.of(cfg)
    seqs = run.read_table("prepare", "sequences.parquet", SEQUENCES)
    targets = run.read_table("prepare", "targets.parquet", TARGETS)
    by_user = dict(zip(seqs.column("user_id").to_pylist(), seqs.column("item_ids").to_pylist()))
    rng = np.random.default_rng(0)
    test = [r for r in targets.to_pylist() if r["split"] == "test"]
    histories = [by_user[test[i]["user_id"]][: test[i]["position"]] for i in rng.permutation(len(test))[:500]]
    import os
    import secrets

    token = os.environ[TOKEN_ENV] = secrets.token_hex(16)  # this app's admin token, never written anywhere
    updates = Path(cfg.run.root) / cfg.run.name / "serve" / "catalog_updates.parquet"
    saved = updates.read_bytes() if updates.is_file() else None  # the bench's items are taken out again
    t = time.time()
    url = start(cfg)
    startup = time.time() - t
    items = len(set(seqs.column("item_ids").combine_chunks().flatten().to_pylist()))
    print(f"app up at {url} in {startup:.1f}s ({len(histories)} test histories, catalog {items} items)", flush=True)
    for h in histories[:4]:  # warm-up
        post(url, {"history": h, "k": args.k})
    try:
        levels = []
        for c in [int(x) for x in args.levels.split(",")]:
            r = load(url, histories, c, args.requests, args.duration, args.k)
            r.pop("_events")
            levels.append(r)
            print(f"concurrency {c:3d}: {r['requests']:4d} requests, statuses {r['statuses']}, "
                  f"{r['throughput_rps']} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms", flush=True)
        # overload: the sustainable level again for the same time, then factor x its clients
        ref = load(url, histories, args.sustainable, 100_000, args.fault_duration, args.k)
        ref.pop("_events")
        over = load(url, histories, args.overload_factor * args.sustainable, 100_000, args.fault_duration, args.k)
        over.pop("_events")
        other = {s: n for s, n in over["statuses"].items() if s not in ("200", "503")}
        overload = {"sustainable_concurrency": args.sustainable, "overload_concurrency": over["concurrency"],
                    "requests": over["requests"], "accepted": over["ok"], "shed_503": over["shed_503"],
                    "other_statuses": other, "timeouts": over["timeouts"],
                    "p99_accepted_ms": over["p99_ms"], "p99_sustainable_ms": ref["p99_ms"],
                    "p99_ratio": round(over["p99_ms"] / ref["p99_ms"], 3) if over["p99_ms"] and ref["p99_ms"] else None,
                    "p99_503_ms": over["p99_503_ms"], "throughput_accepted_rps": over["throughput_rps"],
                    "throughput_sustainable_rps": ref["throughput_rps"]}
        print(f"overload x{args.overload_factor}: {over['requests']} requests, {over['ok']} accepted, "
              f"{over['shed_503']} shed (503, p99 {over['p99_503_ms']} ms), other {other}; p99 accepted "
              f"{over['p99_ms']} ms vs {ref['p99_ms']} ms at {args.sustainable} ({overload['p99_ratio']}x)", flush=True)
        faults = [_fault_run(cfg, url, histories, what, args) for what in args.faults.split(",") if what]
        held_out = held_out_updates(run, args.updates, args.buyers)
        if held_out:
            print(f"catalog updates: {len(held_out)} of the run's held-out items (data.holdout), each asked for by "
                  f"the test users who buy it next", flush=True)
        updates_rows = _catalog_updates(url, token, histories, args.updates, args.k, held_out) if args.updates else []
    finally:
        stop(cfg)
        if saved is None:
            updates.unlink(missing_ok=True)
        else:
            updates.write_bytes(saved)
    return {"app": {"config": args.config, "run": cfg.run.name, "catalog_items": items,
                    "generator_replicas": 2, "grounder_replicas": 2, "backend": cfg.serve.backend,
                    "num_beams": args.beams, "k": args.k, "constrained": True,
                    "generator_max_ongoing_per_replica": half, "generator_max_queued": half,
                    "max_batch_size": cfg.serve.max_batch_size, "retry": cfg.serve.retry.model_dump(),
                    "ctg_method": cfg.ctg.method, "term_writer_budget_s": cfg.serve.term_writer_budget_s,
                    "term_writer_retries": cfg.serve.term_writer_retries, "startup_seconds": round(startup, 1)},
            "bounds": {"requests_per_level": args.requests, "max_seconds_per_level": args.duration,
                       "overload_and_fault_seconds": args.fault_duration, "target": "127.0.0.1"},
            "levels": levels, "overload": overload, "faults": faults, "catalog_updates": updates_rows,
            "tables": [{"title": "load (per concurrency level)",
                        "columns": ["concurrency", "requests", "errors", "throughput_rps", "p50_ms", "p99_ms"],
                        "rows": levels},
                       {"title": f"overload: {over['concurrency']} clients vs the sustainable {args.sustainable}",
                        "rows": [{k: v for k, v in overload.items() if k != "other_statuses"}]},
                       {"title": "fault runs: one kill under load each",
                        "columns": ["killed", "requests", "failed_requests", "retries", "retried_requests",
                                    "catalog_version_before", "catalog_versions_after", "replaced_s", "p99_ms"],
                        "rows": faults},
                       {"title": f"catalog updates (ctg.method={cfg.ctg.method}, serve.term_writer_budget_s="
                                 f"{cfg.serve.term_writer_budget_s}; the first starts the term writer)",
                        "columns": ["item", "cold", "source", "admin_s", "term_writer_s", "writer_load_s",
                                    "recommendable_s", "recommend_status", "buyers", "buyers_hit"],
                        "rows": updates_rows}],
            "added_items_recommended": _buyers_summary(updates_rows, args.k),
            "file_name": "serve_load"}
