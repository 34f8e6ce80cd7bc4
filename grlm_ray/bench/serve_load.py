"""Serving load test and fault run (loopback only; bounded request count and duration).

    grlm demo          # a trained demo run (runs/demo)
    grlm bench serve-load --root runs --levels 1,2,4,8 --requests 60 --duration 60

Starts the Serve app of configs/demo.yaml on 127.0.0.1 with two generator replicas, then:
1. for each concurrency level, sends up to --requests POST /v1/recommend (histories of seeded test users)
   within --duration seconds: p50/p99 latency, throughput, errors;
2. fault run: at --concurrency-fault, kills one generator replica (ray.kill) --kill-after seconds in and
   records failed requests (and how many were in flight at the kill), when the last failure ended, and
   when Serve reported the replica count restored.
Writes benchmarks/results/serve_load.json with the machine description and prints a table.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from grlm_ray.bench.common import REPO


def post(url: str, body: dict, timeout: float = 120) -> tuple[int, float, dict | None]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/recommend", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = json.loads(r.read())
            return r.status, time.perf_counter() - t, out
    except urllib.error.HTTPError as e:
        return e.code, time.perf_counter() - t, None
    except Exception:  # noqa: BLE001 - a dropped connection counts as a failed request
        return 0, time.perf_counter() - t, None


def load(url: str, histories: list[list[str]], concurrency: int, n: int, duration: float, k: int,
         log: list | None = None) -> dict:
    deadline = time.time() + duration
    counter = iter(range(n))
    lock = threading.Lock()
    results: list[tuple[float, int, float]] = []  # (start time, status, latency)

    def worker() -> None:
        while time.time() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.time()
            status, lat, _ = post(url, {"history": histories[i % len(histories)], "k": k})
            with lock:
                results.append((start, status, lat))
                if log is not None:
                    log.append((start, status, lat))

    t0 = time.time()
    with ThreadPoolExecutor(concurrency) as ex:
        for _ in range(concurrency):
            ex.submit(worker)
    wall = time.time() - t0
    ok = np.asarray([lat for _, s, lat in results if s == 200]) * 1000
    errors = sum(1 for _, s, _ in results if s != 200)
    return {"concurrency": concurrency, "requests": len(results), "errors": errors,
            "seconds": round(wall, 2), "throughput_rps": round(len(ok) / wall, 3) if wall else None,
            "p50_ms": round(float(np.percentile(ok, 50)), 1) if len(ok) else None,
            "p99_ms": round(float(np.percentile(ok, 99)), 1) if len(ok) else None,
            "mean_ms": round(float(ok.mean()), 1) if len(ok) else None}


def generator_replicas(app: str) -> list[str]:
    from ray.util.state import list_actors

    return [a.name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if a.class_name == f"ServeReplica:{app}:Generator" and a.name]


def running_replicas(app: str) -> int:
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None:
        return 0
    d = st.deployments.get("Generator")
    return int(d.replica_states.get("RUNNING", 0)) if d is not None else 0


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="a run with a trained model")
    ap.add_argument("--root", default="runs")
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--concurrency-fault", type=int, default=4)
    ap.add_argument("--fault-duration", type=float, default=45.0)
    ap.add_argument("--kill-after", type=float, default=8.0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from grlm_ray.config import load_config
    from grlm_ray.schemas import SEQUENCES, TARGETS
    from grlm_ray.serving import start, stop
    from grlm_ray.storage import Store

    from grlm_ray.runtime import free_port

    cfg = load_config(args.config, [f"run.root={args.root}", "ray.progress_bars=false", f"serve.port={free_port()}",
                                    f"serve.num_beams={args.beams}", "serve.generator.min_replicas=2",
                                    "serve.generator.max_replicas=2", "serve.generator.num_cpus=0.5",
                                    "serve.grounder.num_cpus=0.1"])
    store = Store(cfg.run.root)
    seqs = store.read_table(f"{cfg.run.name}/prepare/sequences.parquet", SEQUENCES)
    targets = store.read_table(f"{cfg.run.name}/prepare/targets.parquet", TARGETS)
    by_user = dict(zip(seqs.column("user_id").to_pylist(), seqs.column("item_ids").to_pylist()))
    rng = np.random.default_rng(0)
    test = [r for r in targets.to_pylist() if r["split"] == "test"]
    histories = [by_user[test[i]["user_id"]][: test[i]["position"]] for i in rng.permutation(len(test))[:200]]
    t = time.time()
    url = start(cfg)
    startup = time.time() - t
    print(f"app up at {url} in {startup:.1f}s", flush=True)
    post(url, {"history": histories[0], "k": args.k})  # warm-up
    levels = []
    for c in [int(x) for x in args.levels.split(",")]:
        r = load(url, histories, c, args.requests, args.duration, args.k)
        levels.append(r)
        print(f"concurrency {c:3d}: {r['requests']:4d} requests, {r['errors']} errors, {r['throughput_rps']} req/s, "
              f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms", flush=True)

    # fault run: kill one generator replica under load
    events: list = []
    result: dict = {}
    before = generator_replicas(cfg.serve.app_name)

    def killer() -> None:
        time.sleep(args.kill_after)
        name = before[0]
        result["killed"] = name
        result["kill_time"] = time.time()
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        deadline = time.time() + args.fault_duration + 60
        while time.time() < deadline:  # until Serve has replaced it
            alive = generator_replicas(cfg.serve.app_name)
            if running_replicas(cfg.serve.app_name) >= 2 and name not in alive and len(alive) >= 2:
                result["replicas_restored_s"] = round(time.time() - result["kill_time"], 2)
                return
            time.sleep(0.25)

    th = threading.Thread(target=killer)
    th.start()
    fault = load(url, histories, args.concurrency_fault, 10_000, args.fault_duration, args.k, log=events)
    th.join()
    kt = result["kill_time"]
    fails = [(s - kt, s + lat - kt) for s, st, lat in events if st != 200]  # (start, end) relative to the kill
    fault.update({"killed_replica": result["killed"], "kill_after_s": args.kill_after,
                  "failed_requests": len(fails),
                  "failed_in_flight_at_kill": sum(1 for a, b in fails if a < 0 <= b),
                  "last_failure_ended_s_after_kill": round(max(b for _, b in fails), 2) if fails else None,
                  "replicas_restored_s": result.get("replicas_restored_s")})
    print(f"fault run: killed {result['killed']} at +{args.kill_after}s; {fault['requests']} requests, "
          f"{fault['failed_requests']} failed ({fault['failed_in_flight_at_kill']} in flight at the kill, the last "
          f"ended {fault['last_failure_ended_s_after_kill']}s after it); replica count restored after "
          f"{fault['replicas_restored_s']}s", flush=True)
    stop(cfg)
    return {"app": {"config": args.config, "generator_replicas": 2, "grounder_replicas": "1-2 (autoscaled)",
                   "backend": cfg.serve.backend, "num_beams": args.beams, "k": args.k, "constrained": True,
                   "max_batch_size": cfg.serve.max_batch_size, "startup_seconds": round(startup, 1)},
           "bounds": {"requests_per_level": args.requests, "max_seconds_per_level": args.duration,
                      "fault_seconds": args.fault_duration, "target": "127.0.0.1"},
           "levels": levels, "fault": fault,
           "tables": [{"title": "load (per concurrency level)", "rows": levels},
                      {"title": "fault run: one generator replica killed under load", "rows": [fault]}]}
