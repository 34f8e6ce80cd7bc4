"""``grlm bench scale``: time and peak memory of every stage that needs no LLM, at catalog sizes from the
joint 10-category shape up to 1M items, and how each grows (log-log slope between sizes).

The catalog is synthetic but shaped like the real one: the ten Amazon 2014 5-core domains in their real
proportions (items, users, interactions per user), Zipf word and item popularity, a vocabulary that grows
with the catalog (``SyntheticSource.text: zipf``). Each stage runs in its own process — the real CLI verb
(``grlm prep``, ``neighbors``, ``ctg``, ``sft``) or, for the parts of a stage with no verb of their own
(tokenization, the evaluation's data path, EIG, the serving catalog), ``python -m grlm_ray.bench.scale
STEP CONFIG`` — while a sampler records the peak RSS of that process and of every process it starts (Ray's
workers included). Embeddings are synthetic vectors of MiniLM's shape (clustered by product type); the real
MiniLM is timed on a seeded sample and reported per item.

    grlm bench scale                               # joint-10 shape (~134k items) and 300k
    grlm bench scale --sizes joint10,300k,1m       # + 1M items (long: ~1 h on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

# the ten domains of configs/joint10.yaml: (items, users, interactions) in the Amazon 2014 5-core files
# (Beauty, Sports, Toys checked against ../shared's bundles; the totals are 134,072 / 281,000 / 2,359,270)
JOINT10: dict[str, tuple[str, int, int, int]] = {
    "baby": ("Baby", 7_050, 19_445, 160_792),
    "beauty": ("Beauty", 12_101, 22_363, 198_502),
    "phones": ("Cell Phones and Accessories", 10_429, 27_879, 194_439),
    "grocery": ("Grocery and Gourmet Food", 8_713, 14_681, 151_254),
    "health": ("Health and Personal Care", 18_534, 38_609, 346_355),
    "home": ("Home and Kitchen", 28_237, 66_519, 551_682),
    "pet": ("Pet Supplies", 8_510, 19_856, 157_836),
    "sports": ("Sports and Outdoors", 18_357, 35_598, 296_337),
    "tools": ("Tools and Home Improvement", 10_217, 16_638, 134_476),
    "toys": ("Toys and Games", 11_924, 19_412, 167_597),
}
JOINT10_ITEMS = sum(v[1] for v in JOINT10.values())
SIZES = {"joint10": JOINT10_ITEMS, "300k": 300_000, "1m": 1_000_000, "30k": 30_000}
# items generated per item wanted: the 5-core filter drops the rarely bought ones (~1/3 of them at these densities: 187,702 generated -> 124,501 kept at OVERSAMPLE 1.4)
OVERSAMPLE = 1.5

STEPS = ("prep", "embed", "neighbors-flat", "neighbors-ivf", "ctg", "sft", "tokenize", "eval-data", "eig",
         "serving-catalog")


def size_config(size: str, root: Path) -> Path:
    """A joint config of ten synthetic domains with the joint-10 proportions, scaled to ``size`` items."""
    import yaml

    from grlm_ray.bench.common import REPO

    f = SIZES[size] / JOINT10_ITEMS
    domains = {}
    for k, (key, (name, items, users, inter)) in enumerate(JOINT10.items()):
        domains[key] = {"kind": "synthetic", "text": "zipf", "category": name, "seed": k + 1,
                        "num_items": max(20, round(items * f * OVERSAMPLE)), "num_users": max(10, round(users * f)),
                        "mean_length": round(inter / users, 2)}
    cfg = {"extends": [str(REPO / "configs" / "bench" / "cpu_recipe.yaml")],
           "run": {"name": f"scale-{size}", "root": str(root)},
           "data": {"mode": "joint", "domains": domains},
           "ray": {"num_cpus": os.cpu_count() or 2, "progress_bars": False},
           "ctg": {"method": "lexical"}, "sft": {"terms": "ctg"},
           "neighbors": {"index": "ivf"},
           "eval": {"split": "test"}}
    path = root / f"scale-{size}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# --------------------------------------------------------------------------- measuring a process tree
class TreeSampler:
    """Peak RSS and PSS of a process and all its descendants (sampled every ``interval`` s), per process.

    RSS counts every page a process maps, so the object store's shared pages (Ray's plasma) count once in
    every process that touched them; PSS splits a shared page among its sharers, so the tree's PSS is what
    the step really takes from the machine. The memory cap is on the tree's PSS."""

    def __init__(self, pid: int, interval: float = 0.1, cap_bytes: int | None = None) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.cap = cap_bytes
        self.capped = False
        self.peak: dict[int, tuple[int, int, str]] = {}  # pid -> (peak rss, peak pss, name)
        self.peak_total = 0
        self.peak_total_pss = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.Error:
                procs = []
            total = total_pss = 0
            for p in procs:
                try:
                    mi = p.memory_full_info()
                    name = p.name()
                except psutil.Error:
                    continue
                rss, pss = mi.rss, getattr(mi, "pss", mi.rss)
                total += rss
                total_pss += pss
                old = self.peak.get(p.pid, (0, 0, name))
                self.peak[p.pid] = (max(old[0], rss), max(old[1], pss), name)
            self.peak_total = max(self.peak_total, total)
            self.peak_total_pss = max(self.peak_total_pss, total_pss)
            if self.cap and total_pss > self.cap and not self.capped:  # protect the machine: stop the step
                self.capped = True
                for p in reversed(procs):
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._t.join()
        mb = 2**20
        root = self.peak.get(self.root.pid, (0, 0, ""))
        others = [v for pid, v in self.peak.items() if pid != self.root.pid]
        top = max(others, default=(0, 0, ""))
        top_pss = max(others, key=lambda v: v[1], default=(0, 0, ""))
        return {**({"killed_over_mb": round(self.cap / mb)} if self.capped and self.cap else {}),
                "driver_peak_rss_mb": round(root[0] / mb), "driver_peak_pss_mb": round(root[1] / mb),
                "other_peak_rss_mb": round(top[0] / mb), "other_peak_process": top[2] or None,
                "other_peak_pss_mb": round(top_pss[1] / mb), "other_peak_pss_process": top_pss[2] or None,
                "tree_peak_rss_mb": round(self.peak_total / mb), "tree_peak_pss_mb": round(self.peak_total_pss / mb)}


def measure(cmd: list[str], log_path: Path, cap_gb: float | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        sampler = TreeSampler(proc.pid, cap_bytes=int(cap_gb * 2**30) if cap_gb else None)
        rc = proc.wait()
    mem = sampler.stop()
    return {"seconds": round(time.perf_counter() - t0, 1), "rc": rc, **mem}


def step_command(step: str, cfg_path: Path) -> list[str]:
    grlm = [sys.executable, "-m", "grlm_ray.cli"]
    if step == "prep":
        return grlm + ["prep", str(cfg_path)]
    if step == "neighbors-flat":
        return grlm + ["neighbors", str(cfg_path), "neighbors.index=flat"]
    if step == "neighbors-ivf":
        return grlm + ["neighbors", str(cfg_path)]
    if step in ("ctg", "sft"):
        return grlm + [step, str(cfg_path)]
    return [sys.executable, "-m", "grlm_ray.bench.scale", step, str(cfg_path)]


# --------------------------------------------------------------------------- in-process steps
def _step_embed(cfg: Any, out: dict[str, Any]) -> None:
    """Synthetic embeddings of MiniLM's shape through the embed stage's own key and contract (clustered by
    product type and brand, so neighbours and IVF see real structure); the real MiniLM timed on a sample."""
    import dataclasses

    import numpy as np
    import pyarrow as pa

    from grlm_ray.core.run import Run
    from grlm_ray.core.schemas import EMBEDDINGS, ITEMS
    from grlm_ray.core.storage import StageContext, release_arrow_memory
    from grlm_ray.lib.models import quiet_loading, resolve_model_path
    from grlm_ray.lib.textformat import item_text

    run = Run.of(cfg)
    items = run.read_table("prepare", "items.parquet", ITEMS)
    n, dim = items.num_rows, 384
    rng = np.random.default_rng(0)
    sample = sorted(rng.choice(n, size=min(n, 1000), replace=False).tolist())
    rows = items.take(sample).to_pylist()
    # only what the synthetic vectors are made from is kept (not every description next to the matrix)
    items = items.select(["item_id", "categories", "brand"]).combine_chunks()
    texts = [item_text(r["title"], r["description"], r["categories"], r["brand"], r["category"], cfg.embed.max_chars)
             for r in rows]
    quiet_loading()
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(os.cpu_count() or 1)
    model = SentenceTransformer(resolve_model_path(cfg.embed.model), device="cpu")
    model.encode(texts[:32], batch_size=cfg.embed.batch_size)
    t0 = time.perf_counter()
    model.encode(texts, batch_size=cfg.embed.batch_size, normalize_embeddings=True)
    per_item = (time.perf_counter() - t0) / len(texts)
    dim = int(model.get_sentence_embedding_dimension() or dim)
    del model
    release_arrow_memory()  # the descriptions read for the sample
    out.update({"minilm_sample_items": len(texts), "minilm_ms_per_item": round(per_item * 1000, 2),
                "minilm_extrapolated_seconds": round(per_item * n, 1)})

    def body(ctx: StageContext) -> None:
        types = items.column("categories").to_pylist()
        keys = [f"{r[0]}/{r[1]}" if len(r) > 1 else str(r) for r in types]
        uniq = {k: j for j, k in enumerate(dict.fromkeys(keys))}
        brand_codes = {b: j for j, b in enumerate(dict.fromkeys(items.column("brand").to_pylist()))}
        g = np.random.default_rng(1)
        centers = g.standard_normal((len(uniq), dim), dtype=np.float32)
        brands = g.standard_normal((len(brand_codes), dim), dtype=np.float32)
        t_idx = np.fromiter((uniq[k] for k in keys), np.int64, n)
        b_idx = np.fromiter((brand_codes[b] for b in items.column("brand").to_pylist()), np.int64, n)
        del keys, types

        def parts() -> Any:  # written a part at a time, as the embed stage's actors write theirs
            for s in range(0, n, 65536):
                e = min(n, s + 65536)
                m = centers[t_idx[s:e]] + 0.4 * brands[b_idx[s:e]] + 0.8 * g.standard_normal((e - s, dim), dtype=np.float32)
                m /= np.linalg.norm(m, axis=1, keepdims=True)
                yield pa.table({"item_id": items.column("item_id").slice(s, e - s),
                                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1), pa.float32()), dim)})

        # each part checked against the contract; the ids are the prepared catalog's, unique already
        ctx.write_batches("embeddings.parquet", parts(), dataclasses.replace(EMBEDDINGS, unique=()))
        ctx.info.update({"model": "synthetic (grlm bench scale)", "dim": dim})

    run.run_stage("embed", body)


def _tokenizer_dir(cfg: Any) -> str:
    from grlm_ray.core.run import Run

    run = Run.of(cfg)
    return run.store.path(run.file("bench-scale/tokenizer"))


def _step_tokenize(cfg: Any, out: dict[str, Any]) -> None:
    """The train stage's data path before any training: the term vocabulary, the tokenizer built over every
    text the model will see, every SFT sample tokenized and bucketed."""
    import tempfile

    from grlm_ray.core.schemas import ITEMS, SFT, TERMS
    from grlm_ray.core.run import Run
    from grlm_ray.stages.train import build_backbone, corpus_texts, term_vocabulary, tokenize_sft

    run = Run.of(cfg)

    def sft_t(columns: list[str] | None) -> Any:  # as the train stage reads it: a batch at a time
        return run.read_batches("sft", "sft.parquet", SFT, columns, batch_rows=8192)

    terms = run.read_table("sft", "terms.parquet", TERMS)
    items = run.read_table("prepare", "items.parquet", ITEMS, columns=["item_id", "title"])  # as the stage
    t0 = time.perf_counter()
    all_terms = term_vocabulary(terms)
    corpus = corpus_texts(cfg, sft_t, items, terms)
    with tempfile.TemporaryDirectory() as tmp:
        build_backbone(cfg.model, corpus, tmp, all_terms, embedder=cfg.embed.model)
        from grlm_ray.lib.models import load_tokenizer

        tok = load_tokenizer(tmp)
        tok.save_pretrained(_tokenizer_dir(cfg))
    t1 = time.perf_counter()
    # as the train stage writes them: the sorted rows streamed into the artifact
    batches = tokenize_sft(tok, sft_t, cfg, write=lambda rows: run.store.write_batches(
        run.file("bench-scale/tokens.parquet"), rows))
    out.update({"vocabulary_build_seconds": round(t1 - t0, 1), "tokenize_seconds": round(time.perf_counter() - t1, 1),
                "terms": len(all_terms), "sft_samples": batches.stats["samples"], "tokens": batches.stats["tokens"]})


def _step_eval_data(cfg: Any, out: dict[str, Any]) -> None:
    """The evaluation's data path around the model, in the driver's order: targets, prompts, popularity, the
    TIDs' tokens, then (on synthetic answers of the real shape) the predictions written and scored as the
    stage does; then the TID token trie and the EIG index each recommender actor builds."""
    from grlm_ray.core.schemas import ITEMS, SEQUENCES, TARGETS, TERMS
    from grlm_ray.core.run import Run
    from grlm_ray.core.storage import release_arrow_memory
    from grlm_ray.lib.decoding import TidTrie, tid_token_arrays
    from grlm_ray.lib.eig import TidIndex, tid_text
    from grlm_ray.lib.models import load_tokenizer
    from grlm_ray.lib.protocol import query_table, training_popularity

    run = Run.of(cfg)
    tok = load_tokenizer(_tokenizer_dir(cfg))
    items = run.read_table("prepare", "items.parquet", ITEMS, columns=["item_id", "title"])  # as the stage
    seqs = run.read_table("prepare", "sequences.parquet", SEQUENCES)
    targets = run.read_table("prepare", "targets.parquet", TARGETS)
    terms_t = run.read_table("sft", "terms.parquet", TERMS)
    laps: dict[str, float] = {}
    rss = _Rss()
    t = time.perf_counter()
    queries = query_table(cfg, items, seqs, targets, terms_t, tok, history=False)  # as the stage
    laps["prompts_seconds"] = time.perf_counter() - t
    rss("prompts")
    t = time.perf_counter()
    popular = training_popularity(seqs, targets)
    laps["popularity_seconds"] = time.perf_counter() - t
    del items, seqs, targets  # as the stage: the driver needs neither once the prompts are built
    release_arrow_memory()
    rss("popularity")
    ids, tids = terms_t.column("item_id").to_pylist(), terms_t.column("terms").to_pylist()
    t = time.perf_counter()
    flat, offsets = tid_token_arrays(tok, map(tid_text, tids))  # the driver's too (the longest TID's tokens)
    laps["tid_tokens_seconds"] = time.perf_counter() - t
    rss("tid_tokens")
    # the answers of every user as the recommender actors return them (synthetic: 20 grounded items, 20 beams'
    # TIDs and flags per user, in the order the stage's blocks come back), through the stage's own collection:
    # the predictions written in query order and scored a window at a time. In this order, as in the stage's
    # driver; the trie and the EIG index after it are what each recommender actor builds (timed here too).
    import numpy as np
    import pyarrow as pa

    from grlm_ray.core.storage import StageContext
    from grlm_ray.stages.evaluate import ANSWERS, length_order, write_predictions

    g = np.random.default_rng(3)
    n, beams = queries.num_rows, 20
    texts = [tid_text(t) for t in tids]
    order = length_order(g.integers(20, 400, n))  # as the stage cuts its blocks: by length inside windows

    def answers() -> Any:  # generated as they would come back, a block at a time
        for s in range(0, n, 512):
            rows = order[s:s + 512]
            pick = g.integers(0, len(ids), (len(rows), beams))
            yield pa.record_batch({"row": pa.array(rows), **dict(zip(ANSWERS, (
                pa.array(["\t".join(ids[j] for j in r) for r in pick], pa.string()),
                pa.array(["\t".join(["direct"] * 3 + ["eig"] * (beams - 3))] * len(rows), pa.string()),
                pa.array(["\t".join(texts[j] for j in r) for r in pick], pa.string()),
                pa.array(["\t".join(["1"] * beams)] * len(rows), pa.string()))))})

    t = time.perf_counter()
    write_predictions(StageContext(run.store, run.name, "bench-scale/eval"), queries.select(
        ["row", "user_id", "split", "domain", "target_item_id"]), answers(), popular, cfg.eval.ks)
    laps["answers_and_predictions_seconds"] = time.perf_counter() - t
    rss("predictions")
    texts = order = None  # the answers are written: their inputs go
    t = time.perf_counter()
    trie = TidTrie.from_arrays(flat, offsets, tok.eos_token_id if tok.eos_token_id is not None else 0)
    laps["trie_seconds"] = time.perf_counter() - t
    rss("trie")
    del flat, offsets
    t = time.perf_counter()
    index = TidIndex(ids, tids, fallback_order=popular)
    laps["eig_index_seconds"] = time.perf_counter() - t
    rss("eig_index")
    del trie, index
    out.update({k: round(v, 2) for k, v in laps.items()})
    out["rss_after_mb"] = rss.marks
    out["test_users"] = queries.num_rows


class _Rss:
    """The process's RSS after each named lap (MB): where a step's memory goes."""

    def __init__(self) -> None:
        import psutil

        self.proc, self.marks = psutil.Process(), {}

    def __call__(self, lap: str) -> None:
        self.marks[lap] = round(self.proc.memory_info().rss / 2**20)


def _step_eig(cfg: Any, out: dict[str, Any]) -> None:
    """EIG at this size on the run's own (statistical-CTG) TIDs: direct and structural query latency;
    structural queries are TIDs with one or two terms replaced by other catalog terms."""
    import numpy as np

    from grlm_ray.bench.eig import grounding_latency
    from grlm_ray.core.schemas import TERMS
    from grlm_ray.core.run import Run
    from grlm_ray.lib.eig import TidIndex

    terms_t = Run.of(cfg).read_table("sft", "terms.parquet", TERMS)
    ids, tids = terms_t.column("item_id").to_pylist(), terms_t.column("terms").to_pylist()
    t = time.perf_counter()
    index = TidIndex(ids, tids)
    build = time.perf_counter() - t
    rng = np.random.default_rng(0)
    vocab = index.vocab_list
    picks = rng.choice(len(tids), size=1000, replace=False)
    direct = [list(tids[i]) for i in picks]
    structural = []
    for i in picks:
        q = list(tids[i])
        for j in rng.choice(len(q), size=int(rng.integers(1, 3)), replace=False):
            q[j] = vocab[int(rng.integers(len(vocab)))]
        structural.append(q)
    out.update({"items": len(ids), "vocabulary": len(vocab), "index_build_seconds": round(build, 2)})
    for name, qs in (("direct", direct), ("structural", structural)):
        lat = grounding_latency(index, qs)
        out[f"{name}_p50_us"], out[f"{name}_p99_us"] = lat["p50_us"], lat["p99_us"]


def _step_serving_catalog(cfg: Any, out: dict[str, Any]) -> None:
    """What serving does with the catalog: the registry loads it, each replica pulls it through the object
    store (its pickled size) and rebuilds its grounding index and token trie (the swap)."""
    import pickle

    from grlm_ray.core.run import Run
    from grlm_ray.lib.decoding import TidTrie, tid_token_arrays
    from grlm_ray.lib.eig import TidIndex, tid_text
    from grlm_ray.lib.models import load_tokenizer
    from grlm_ray.serving.catalog import read_catalog

    t = time.perf_counter()
    cat = read_catalog(Run.of(cfg))
    out["registry_load_seconds"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    blob = pickle.dumps(cat, protocol=5)
    pickle.loads(blob)
    out["replica_pull_seconds"] = round(time.perf_counter() - t, 2)
    out["catalog_pickled_mb"] = round(len(blob) / 2**20, 1)
    del blob
    ids = cat.item_ids
    t = time.perf_counter()
    TidIndex(ids, cat.tids.values(), fallback_order=cat.popular)
    out["grounder_swap_seconds"] = round(time.perf_counter() - t, 2)
    tok = load_tokenizer(_tokenizer_dir(cfg))
    t = time.perf_counter()
    TidTrie.from_arrays(*tid_token_arrays(tok, map(tid_text, cat.tids.values())), tok.eos_token_id or 0)
    out["generator_swap_seconds"] = round(time.perf_counter() - t, 2)


IN_PROCESS = {"embed": _step_embed, "tokenize": _step_tokenize, "eval-data": _step_eval_data, "eig": _step_eig,
              "serving-catalog": _step_serving_catalog}


def step_main(argv: list[str]) -> int:
    """``python -m grlm_ray.bench.scale STEP CONFIG``: one in-process step; its details as the last line."""
    import logging

    from grlm_ray.core.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    step, cfg_path = argv[0], argv[1]
    cfg = load_config(cfg_path, argv[2:])
    out: dict[str, Any] = {}
    IN_PROCESS[step](cfg, out)
    print("BENCH_SCALE_STEP " + json.dumps(out))
    return 0


# --------------------------------------------------------------------------- the benchmark
def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--sizes", default="joint10,300k", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of the steps, in order")
    ap.add_argument("--root", default=None, help="where the runs go (default: a folder under /tmp); reused: "
                                                 "finished stages are skipped")
    ap.add_argument("--max-rss-gb", type=float, default=15.0,
                    help="a step whose processes pass this much memory together (PSS: shared pages split "
                         "among their sharers) is stopped (and reported)")
    ap.add_argument("--flat-max-items", type=int, default=400_000,
                    help="exact (flat) neighbours only up to this many items: O(n^2)")


def _details(log_path: Path) -> dict[str, Any]:
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        if line.startswith("BENCH_SCALE_STEP "):
            return json.loads(line.split(" ", 1)[1])
    return {}


def _stage_info(root: Path, size: str, stage: str) -> dict[str, Any]:
    p = root / f"scale-{size}" / stage / "_manifest.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from grlm_ray.core.config import load_config

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES] + [s for s in steps if s not in STEPS]
    if bad:
        raise SystemExit(f"unknown size/step {bad}; sizes {list(SIZES)}, steps {list(STEPS)}")
    root = Path(args.root or tempfile.mkdtemp(prefix="grlm-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    shapes: dict[str, dict[str, Any]] = {}
    for size in sizes:
        cfg_path = size_config(size, root)
        log_path = root / f"scale-{size}.log"
        for step in steps:
            if step == "neighbors-flat" and SIZES[size] > args.flat_max_items:
                rows.append({"size": size, "step": step, "skipped": f"> {args.flat_max_items:,} items (O(n^2))"})
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {size}: {step} ...", flush=True)
            m = measure(step_command(step, cfg_path), log_path, args.max_rss_gb)
            row = {"size": size, "step": step, **m, **(_details(log_path) if step in IN_PROCESS else {})}
            if step == "neighbors-ivf" and m["rc"] == 0:  # the stage's own check against exact search
                info = _stage_info(root, size, "neighbors").get("info", {})
                row.update({"ivf_recall_at_10": info.get("recall_at_k"), "ivf_recall_sample": info.get("recall_sample")})
            if m["rc"] != 0:
                row["error"] = (f"stopped: its processes passed {args.max_rss_gb} GB together" if m.get("killed_over_mb")
                                else f"exit {m['rc']}: see {log_path}")
                rows.append(row)
                print(f"  failed: {row['error']}", flush=True)
                break
            rows.append(row)
            print(f"  {m['seconds']} s, driver RSS {m['driver_peak_rss_mb']} MB (PSS {m['driver_peak_pss_mb']}), "
                  f"largest other {m['other_peak_rss_mb']} MB ({m['other_peak_process']}), tree PSS "
                  f"{m['tree_peak_pss_mb']} MB", flush=True)
        cfg = load_config(str(cfg_path))
        shapes[size] = {"generated_items": sum(d.num_items for d in cfg.data.domains.values()),
                        **_prepared_shape(root / f"scale-{size}" / "prepare"),
                        "ctg": {k: v for k, v in _stage_info(root, size, "ctg").get("info", {}).items()
                                if k in ("before_resolution", "after_resolution", "items_per_second")}}
    slopes = _slopes(rows, sizes, shapes)
    result = {"args": {k: v for k, v in vars(args).items() if k != "out_dir"}, "root": str(root), "shapes": shapes,
              "rows": rows, "slopes": slopes,
              "tables": [{"title": "time and peak RSS per stage and size",
                          "rows": [{k: r.get(k) for k in ("size", "step", "seconds", "driver_peak_rss_mb",
                                                          "driver_peak_pss_mb", "other_peak_rss_mb",
                                                          "other_peak_pss_mb", "other_peak_process",
                                                          "tree_peak_pss_mb", "skipped", "error")}
                                   for r in rows]},
                         {"title": "log-log slope of time and driver RSS vs catalog size (1.0 = linear)",
                          "rows": slopes}]}
    _plot(rows, sizes, shapes, Path(args.out_dir) / (f"scale_{args.tag}.png" if getattr(args, "tag", None) else "scale.png"))
    return result


def _prepared_shape(d: Path) -> dict[str, Any]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        seqs = pq.read_table(d / "sequences.parquet", columns=["item_ids"])
        return {"items": pq.read_metadata(d / "items.parquet").num_rows, "users": seqs.num_rows,
                "interactions": int(pc.sum(pc.list_value_length(seqs.column("item_ids"))).as_py() or 0)}
    except (OSError, KeyError):
        return {}


def _n_items(shapes: dict[str, Any], size: str) -> float:
    return float(shapes[size].get("items") or SIZES[size])


def _slopes(rows: list[dict[str, Any]], sizes: list[str], shapes: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    by = {(r["size"], r["step"]): r for r in rows if "seconds" in r and not r.get("error")}
    for step in STEPS:
        for a, b in zip(sizes, sizes[1:]):
            ra, rb = by.get((a, step)), by.get((b, step))
            if not ra or not rb:
                continue
            dn = math.log(_n_items(shapes, b) / _n_items(shapes, a))
            out.append({"step": step, "from": a, "to": b,
                        "time_slope": round(math.log(max(rb["seconds"], 0.1) / max(ra["seconds"], 0.1)) / dn, 2),
                        "driver_rss_slope": round(math.log(max(rb["driver_peak_rss_mb"], 1) /
                                                           max(ra["driver_peak_rss_mb"], 1)) / dn, 2)})
    return out


def _plot(rows: list[dict[str, Any]], sizes: list[str], shapes: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for step in STEPS:
        pts = [(r["size"], r) for r in rows if r["step"] == step and "seconds" in r and not r.get("error")]
        if not pts:
            continue
        xs = [_n_items(shapes, s) for s, _ in pts]
        axes[0].plot(xs, [max(r["seconds"], 0.1) for _, r in pts], marker="o", label=step)
        axes[1].plot(xs, [max(r["driver_peak_rss_mb"], r["other_peak_rss_mb"]) for _, r in pts], marker="o", label=step)
    ticks = sorted({_n_items(shapes, s) for s in sizes})
    for ax, title in ((axes[0], "seconds"), (axes[1], "peak RSS of one process (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ticks, [f"{t / 1000:,.0f}k" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("catalog items")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].axhline(4096, color="red", linestyle="--", linewidth=1, label="4 GB goal")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(step_main(sys.argv[1:]))
