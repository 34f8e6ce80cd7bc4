"""Stage 3 — CTG (Context-aware Term Generation): an LLM writes each item's Term ID while looking at
the item's neighbours, on a Ray Data actor pool.

Contract: prepare/items + neighbors/neighbors -> ctg/terms (resolved, collision-free) and
ctg/terms_llm (as parsed from the LLM, before collision resolution).

Every output is parsed and validated (exactly N distinct lowercase base-form terms). Outputs that do not
validate are retried with seeded sampling; if none validates, the item gets the statistical TID
(``ctg.repair=lexical``, ``grlm_ray/lib/lexical.py``) or, with ``repair=words``, the LLM's grounded terms
filled from its own text, its neighbours' titles and its category — marked ``valid=False``,
``source='llm+repair'`` and counted. ``ctg.method=lexical`` writes every TID with the statistical rules
(no LLM, one process, ``source='lexical'``); ``ctg.method=words`` is the baseline the rules are measured
against: the item's first N distinct title words (then description, neighbours' titles, category),
``source='words'``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any

import pyarrow as pa

from grlm_ray.core.config import GrlmConfig
from grlm_ray.core.runtime import actor_pool_kwargs, init_ray
from grlm_ray.core.schemas import ITEMS, NEIGHBORS, TERMS
from grlm_ray.core.run import Run
from grlm_ray.core.storage import StageContext
from grlm_ray.lib.generation import resolve_llm_path
from grlm_ray.lib.lexical import LexicalTermWriter
from grlm_ray.lib.termgen import (PROMPT_VERSION, TermWriter, TidJob, build_messages, by_rules, select_items,
                                   statistics_needed, tid_stats, words_tid, write_tids)
from grlm_ray.lib.terms import resolve_terms_table

log = logging.getLogger(__name__)
STAGE = "ctg"


def llm_worker_memory(model_path: str | None) -> int:
    """Host memory an LLM worker asks Ray for: 3.5x its weights on disk + 256 MiB (SmolLM2 in float32: 538 MB
    of weights, a 1.4 GiB peak per worker measured; Ray Data warns below 1.25x the peak), so Ray places
    workers by memory and does not warn mid-stage."""
    from pathlib import Path

    p = Path(model_path or "")
    weights = sum(f.stat().st_size for f in p.glob("*") if f.suffix in (".safetensors", ".bin", ".pt", ".gguf")) \
        if p.is_dir() else (p.stat().st_size if p.is_file() else 0)
    return int(3.5 * weights) + (256 << 20)


def ctg(cfg: GrlmConfig) -> dict[str, Any]:
    c = cfg.ctg
    # converts a GGUF once, before any actor starts; the lexical method needs no LLM
    model_path = resolve_llm_path(c.llm) if c.method == "llm" else None

    def body(ctx: StageContext) -> None:
        import time

        items = ctx.read("items.parquet", ITEMS, stage="prepare")
        # row dicts for the prompts, the fill and the uncovered items; the lexical rules read the catalog
        # a batch at a time and keep only what they use (a row dict per item took ~1 GB at 1M items)
        need_rows = c.method != "lexical" or (c.uncovered == "words" and c.limit is not None)
        item_rows = items.to_pylist() if need_rows else []
        by_id = {r["item_id"]: r for r in item_rows}
        nbrs = _neighbours(ctx, items, c)
        ids = select_items(items, c).column("item_id").to_pylist()
        parts = [ids[s:s + c.part_size] for s in range(0, len(ids), c.part_size)]
        pending = [k for k in range(len(parts)) if not ctx.part_done(f"{k:05d}")]
        log.info("ctg: %d items in %d parts, %d to do (%s)", len(ids), len(parts), len(pending),
                 c.method if by_rules(c) else f"{c.llm.backend}, {c.llm.model}")
        t0 = time.time()
        lexical = None
        if pending and statistics_needed(c, examples_are_statistical=True):
            lexical = LexicalTermWriter(item_rows, nbrs, c.num_terms, c.num_neighbors, c.distinct_terms,
                                        lead=c.lead)
            if not need_rows:
                for b in items.to_batches(max_chunksize=8192):
                    lexical.add_items(b.to_pylist())
        done_items = 0
        if pending and by_rules(c):
            done_items = _write_by_rules(ctx, cfg, parts, pending, lexical, by_id, nbrs)
        elif pending:
            done_items = _write_by_llm(ctx, cfg, model_path, parts, pending, lexical, by_id, nbrs)
        seconds = time.time() - t0
        llm = pa.concat_tables([ctx.read_part(f"{k:05d}", "terms_llm.parquet") for k in range(len(parts))])
        terms_llm, uncovered = _with_uncovered(llm.select(["item_id", "terms", "raw", "valid", "source"]), c, ids,
                                               items.num_rows, item_rows, by_id, nbrs)
        ctx.write("terms_llm.parquet", terms_llm, TERMS)
        resolved, report = (resolve_terms_table(terms_llm, items) if c.resolve_collisions
                            else (terms_llm, None))
        ctx.write("terms.parquet", resolved, TERMS)
        attempts, valid = llm.column("attempts").to_pylist(), llm.column("valid").to_pylist()
        first_try = sum(1 for a, v in zip(attempts, valid) if v and a == 1)
        ctx.info.update({
            "method": c.method, "prompt_version": PROMPT_VERSION if c.method == "llm" else None,
            "backend": c.llm.backend if c.method == "llm" else None, "model": c.llm.model if c.method == "llm" else None,
            "context": c.context, "num_terms": c.num_terms, "items": len(ids),
            "legality_rate": round(sum(valid) / len(valid), 4) if valid else 0.0,
            "legality_rate_first_try": round(first_try / len(valid), 4) if valid else 0.0,
            "repaired_items": len(valid) - sum(valid),
            "items_without_neighbors": sum(1 for i in ids if c.context == "neighbors" and not nbrs.get(i)),
            "uncovered_items_from_words": uncovered,
            "failure_reasons": dict(Counter(r for r in llm.column("reason").to_pylist() if r != "ok").most_common(8)),
            "before_resolution": tid_stats(terms_llm.column("terms").to_pylist()),
            "after_resolution": tid_stats(resolved.column("terms").to_pylist()),
            "collisions": report.as_dict() if report else None,
            "generated_items_this_run": done_items, "generation_seconds": round(seconds, 2),
            "items_per_second": round(done_items / seconds, 3) if done_items and seconds > 0 else None,
            "prompt_example": None if by_rules(c) or not ids else build_messages(
                by_id[ids[0]], _context(ids[0], by_id, nbrs, c.num_neighbors), c),
        })

    return Run.of(cfg).run_stage(STAGE, body, inputs={"items": ("prepare", "items.parquet")})


def _neighbours(ctx: StageContext, items: pa.Table, c: Any) -> dict[str, list[str]]:
    """Each item's first ``ctg.num_neighbors`` neighbours (none for ``context: none``); one string object
    per item id."""
    import pyarrow.compute as pc

    nbrs: dict[str, list[str]] = {}
    if c.context != "neighbors" or c.num_neighbors <= 0:
        return nbrs
    nb = ctx.read("neighbors.parquet", NEIGHBORS, stage="neighbors")
    canon = {i: i for i in items.column("item_id").to_pylist()}
    for b in nb.select(["item_id", "neighbor_ids"]).to_batches(max_chunksize=65536):
        near = pc.list_slice(b.column(1), 0, c.num_neighbors).to_pylist()
        for i, v in zip(b.column(0).to_pylist(), near):
            nbrs[canon.get(i, i)] = [canon.get(j, j) for j in v]
    return nbrs


def _context(i: str, by_id: dict[str, dict], nbrs: dict[str, list[str]], n: int) -> list[dict]:
    """The item rows an item's TID is written looking at: its first ``n`` neighbours that are in the catalog."""
    return [by_id[j] for j in nbrs.get(i, [])[:n] if j in by_id]


def _jobs(ids: list[str], c: Any, lexical: LexicalTermWriter | None, by_id: dict[str, dict],
          nbrs: dict[str, list[str]], examples: bool) -> list[TidJob]:
    """What writing each item's TID looks at (``TidJob``): its neighbour rows, with ``examples`` the first
    ``ctg.few_shot`` of them with their statistical TIDs, and its own statistical TID when the writer has
    statistics (the lexical method, the lexical repair, few-shot examples)."""
    out = []
    for i in ids:
        near = _context(i, by_id, nbrs, c.num_neighbors)
        shown = [(x, lexical.tid(x["item_id"])) for x in near[: c.few_shot]] if examples and lexical is not None else ()
        out.append(TidJob(by_id.get(i) or {"item_id": i}, near, shown, lexical.tid(i) if lexical is not None else ()))
    return out


def _write_by_rules(ctx: StageContext, cfg: GrlmConfig, parts: list[list[str]], pending: list[int],
                    lexical: LexicalTermWriter | None, by_id: dict[str, dict], nbrs: dict[str, list[str]]) -> int:
    """``ctg.method`` lexical / words: every pending part written in this process; items written."""
    from tqdm import tqdm

    c = cfg.ctg

    done = 0
    for k in tqdm(pending, desc=f"ctg parts ({c.method})", disable=not cfg.ray.progress_bars):
        recs = write_tids(c, _jobs(parts[k], c, lexical, by_id, nbrs, examples=False))  # serving's dispatch too
        _save_part(ctx, k, [dict(r, terms="\t".join(r["terms"])) for r in recs])
        done += len(recs)
    return done


def _write_by_llm(ctx: StageContext, cfg: GrlmConfig, model_path: str | None, parts: list[list[str]],
                  pending: list[int], lexical: LexicalTermWriter | None, by_id: dict[str, dict],
                  nbrs: dict[str, list[str]]) -> int:
    """``ctg.method=llm``: the pending parts' items through ``TermWriter`` actors (Ray Data); each part saved
    as soon as all of its items are back; items written."""
    from tqdm import tqdm

    c = cfg.ctg
    rows = []
    for k in pending:
        for job in _jobs(parts[k], c, lexical, by_id, nbrs, examples=True):
            rows.append({"row": len(rows), "part": k, **job.request(c)})
    ray = init_ray(cfg.ray)
    import ray.data

    cpus = int(ray.available_resources().get("CPU", os.cpu_count() or 1))
    # one block per LLM batch: results stream back (and parts get saved) as batches finish, and
    # several workers get work; a single block would hold every result until the very end
    n_blocks = max(1, -(-len(rows) // c.llm.batch_size))
    ds = ray.data.from_items(rows, override_num_blocks=n_blocks).map_batches(
        TermWriter, batch_size=c.llm.batch_size,
        fn_constructor_kwargs={"model_path": model_path, "cfg": c, "threads": max(1, cpus // c.num_workers)},
        **actor_pool_kwargs(cfg.ray, c.num_workers), memory=llm_worker_memory(model_path),
        **({"num_gpus": c.llm.tensor_parallel_size} if c.llm.device.startswith("cuda") else {}))
    buffers: dict[int, list[dict]] = {k: [] for k in pending}
    part_of = {r["item_id"]: r["part"] for r in rows}
    done = 0
    with tqdm(total=len(rows), desc="ctg items", disable=not cfg.ray.progress_bars) as bar:
        for b in ds.iter_batches(batch_format="numpy", batch_size=None):
            for j in range(len(b["item_id"])):
                rec = {key: b[key][j] for key in ("item_id", "terms", "raw", "valid", "source", "attempts", "reason")}
                k = part_of[str(rec["item_id"])]
                buffers[k].append(rec)
                if len(buffers[k]) == len(parts[k]):  # a part is complete: save it now
                    _save_part(ctx, k, buffers.pop(k))
            bar.update(len(b["item_id"]))
            done += len(b["item_id"])
    return done


def _with_uncovered(terms_llm: pa.Table, c: Any, ids: list[str], n_items: int, item_rows: list[dict],
                    by_id: dict[str, dict], nbrs: dict[str, list[str]]) -> tuple[pa.Table, int]:
    """``ctg.uncovered=words`` with ``ctg.limit``: the items CTG did not write get their words TID
    (``valid=False``, ``source='words'``); the table and how many."""
    if c.uncovered != "words" or len(ids) >= n_items:
        return terms_llm, 0
    chosen = set(ids)
    rest = [r for r in item_rows if r["item_id"] not in chosen]
    words = [words_tid(r, _context(r["item_id"], by_id, nbrs, c.num_neighbors), c.num_terms) for r in rest]
    return pa.concat_tables([terms_llm, pa.table({
        "item_id": pa.array([r["item_id"] for r in rest], pa.string()),
        "terms": pa.array(words, pa.list_(pa.string())),
        "raw": pa.array([""] * len(rest), pa.string()),
        "valid": pa.array([False] * len(rest), pa.bool_()),
        "source": pa.array(["words"] * len(rest), pa.string()),
    })]), len(rest)


def _save_part(ctx: StageContext, k: int, recs: list[dict]) -> None:
    table = pa.table({
        "item_id": pa.array([str(r["item_id"]) for r in recs], pa.string()),
        "terms": pa.array([str(r["terms"]).split("\t") for r in recs], pa.list_(pa.string())),
        "raw": pa.array([str(r["raw"]) for r in recs], pa.string()),
        "valid": pa.array([bool(r["valid"]) for r in recs], pa.bool_()),
        "source": pa.array([str(r["source"]) for r in recs], pa.string()),
        "attempts": pa.array([int(r["attempts"]) for r in recs], pa.int32()),
        "reason": pa.array([str(r["reason"]) for r in recs], pa.string()),
    })
    ctx.write_part(f"{k:05d}", {"terms_llm.parquet": (table, None)})
