"""Stage 3 — CTG (Context-aware Term Generation): an LLM writes each item's Term ID while looking at
the item's neighbours, on a Ray Data actor pool.

Contract: prepare/items + neighbors/neighbors -> ctg/terms (resolved, collision-free) and
ctg/terms_llm (as parsed from the LLM, before collision resolution).

Every output is parsed and validated (exactly N distinct lowercase base-form terms). Outputs that do not
validate are retried with seeded sampling; if none validates, the item gets the statistical TID
(``ctg.repair=lexical``, ``grlm_ray/lexical.py``) or, with ``repair=words``, the LLM's grounded terms
filled from its own text, its neighbours' titles and its category — marked ``valid=False``,
``source='llm+repair'`` and counted. ``ctg.method=lexical`` writes every TID with the statistical rules
(no LLM, one process, ``source='lexical'``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from grlm_ray.config import CTGConfig, GrlmConfig
from grlm_ray.schemas import ITEMS, NEIGHBORS, TERMS
from grlm_ray.registry import reads, stage_key
from grlm_ray.storage import StageContext, Store, run_stage
from grlm_ray.terms import STOPWORDS, base_form, colliding_items, resolve_terms_table, text_words

log = logging.getLogger(__name__)
STAGE = "ctg"
PROMPT_VERSION = "ctg-v1"
ANSWER_PREFIX = "Terms:"

SYSTEM = "You write short Term IDs that identify products in a catalog."
INSTRUCTIONS = (
    "Write exactly {n} words that identify the product below, lowercase, each in its base form, ordered by "
    "importance: {order}.{context_rule} Answer with one line: Terms: {example}"
)
ORDER = ["category or type", "function", "distinctive feature", "audience", "selling point"]
CONTEXT_RULE = (" Use the same words as the similar products for what they share, and 1-2 words that set "
                "this product apart from them.")


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def describe(item: dict[str, Any], limit: int) -> str:
    parts = [item.get("title") or ""]
    if item.get("brand"):
        parts.append(f"Brand: {item['brand']}")
    if item.get("categories"):
        parts.append("Categories: " + ", ".join(item["categories"]))
    if item.get("description"):
        parts.append(item["description"])
    text = ". ".join(p for p in parts if p) or f"A product in {item.get('category') or 'the catalog'}"
    return _clip(text, limit)


def build_messages(item: dict[str, Any], neighbors: list[dict[str, Any]], cfg: CTGConfig) -> list[dict[str, str]]:
    """The paper's prompt: the item's metadata and (unless context='none') its neighbours' metadata."""
    n = cfg.num_terms
    use_ctx = bool(cfg.context == "neighbors" and neighbors)
    order = ", ".join(ORDER[: min(n, len(ORDER))]) + (", then more details" if n > len(ORDER) else "")
    slots = [f"<{o}>" for o in ORDER[:n]] + [f"<detail {i + 1}>" for i in range(max(0, n - len(ORDER)))]
    user = INSTRUCTIONS.format(n=n, order=order, context_rule=CONTEXT_RULE if use_ctx else "",
                               example=", ".join(slots))
    user += "\n\nProduct: " + describe(item, cfg.max_item_chars)
    if use_ctx:
        user += "\n\nSimilar products:\n" + "\n".join(
            "- " + describe(nb, cfg.max_neighbor_chars) for nb in neighbors[: cfg.num_neighbors])
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


@dataclass
class Parsed:
    terms: list[str]  # cleaned, distinct, in order
    valid: bool
    reason: str


_SPLIT = re.compile(r"[,;\n|/]+|\s+-\s+|\d+[.)]\s*")
_CLEAN = re.compile(r"[^a-z\- ]+")


# words that only echo the instructions ("category", "word1", "selling point"), never real terms
INSTRUCTION_WORDS = frozenset("word category type function feature distinctive audience selling point "
                              "product name term terms item detail".split())


def normalize_term(raw: str) -> str:
    """'Tea Tree' -> 'tea-tree'; 'Brushes' -> 'brush'; junk and stopwords -> ''."""
    t = _CLEAN.sub(" ", re.sub(r"['\u2019]s\b", "", raw.lower())).strip(" -")
    words = [w for w in re.split(r"[\s]+", t) if w and w not in STOPWORDS and w.strip("-") not in INSTRUCTION_WORDS]
    if not words or len(words) > 3:
        return ""
    if len(words) == 1:
        w = words[0].strip("-")
        if "-" in w:
            w = "-".join(p for p in w.split("-") if p)
        if len(w) < 2 or w in STOPWORDS:
            return ""
        return base_form(w)
    return "-".join(base_form(w) if i == len(words) - 1 else w for i, w in enumerate(words))


def parse_terms(text: str, n: int) -> Parsed:
    """Parse an LLM answer (the text after the 'Terms:' prefix) into exactly n distinct terms."""
    body = text.strip()
    m = re.search(r"terms?\s*:", body, re.I)
    if m:
        body = body[m.end():]
    lines = [ln.strip() for ln in body.strip().splitlines() if ln.strip()]
    if not lines:
        pieces: list[str] = []
    elif re.match(r"^([-*\u2022]|\d+[.)])\s", lines[0]) and len(lines) > 1:
        # a bulleted / numbered list, one term per line
        pieces = [re.sub(r"^([-*\u2022]|\d+[.)])\s*", "", ln) for ln in lines[: n + 2]]
    else:
        pieces = [p for p in _SPLIT.split(lines[0]) if p and p.strip()]
        if len(pieces) == 1 and " " in pieces[0].strip():
            pieces = pieces[0].split()  # "shampoo hair gentle ..." without commas
    terms: list[str] = []
    dropped = 0
    for p in pieces:
        t = normalize_term(p)
        if not t:
            dropped += 1
            continue
        if t not in terms:
            terms.append(t)
    if len(terms) == n:
        return Parsed(terms, True, "ok")
    if len(terms) > n:
        return Parsed(terms, False, f"{len(terms)} terms, expected {n}")
    return Parsed(terms, False, f"{len(terms)} usable terms, expected {n}" + (f" ({dropped} junk)" if dropped else ""))


def repair(parsed: list[str], fallback_texts: list[str], category: str, n: int) -> list[str]:
    """Keep the LLM's terms that are grounded in the item's or its neighbours' text (an invalid answer
    often carries fragments such as 'fluid-oun'), then fill from the item's own words and its context."""
    known = {w for text in fallback_texts for w in text_words(text)}
    grounded = [t for t in dict.fromkeys(parsed) if all(part in known for part in t.split("-"))
                or t in known]
    terms = grounded[:n]
    for text in fallback_texts:
        for w in text_words(text):
            if len(terms) >= n:
                return terms
            if w not in terms:
                terms.append(w)
    for w in [normalize_term(category) or "item", "product", "item", "goods", "article"]:
        if len(terms) >= n:
            break
        if w and w not in terms:
            terms.append(w)
    return terms[:n]


class TermWriter:
    """Ray Data callable class: generate, validate, retry, repair for a batch of prompts."""

    def __init__(self, model_path: str, cfg: CTGConfig, threads: int) -> None:
        from grlm_ray.generation import make_generator

        self.cfg = cfg
        self.gen = make_generator(model_path, cfg.llm, threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        cfg, n = self.cfg, self.cfg.num_terms
        convs = [json.loads(m) for m in batch["messages"]]
        raws = self.gen.generate(convs, prefix=ANSWER_PREFIX, temperature=0.0)
        parsed = [parse_terms(r, n) for r in raws]
        attempts = np.ones(len(convs), dtype=np.int32)
        for attempt in range(cfg.retries):
            todo = [i for i, p in enumerate(parsed) if not p.valid]
            if not todo:
                break
            seed = cfg.seed + 1000 * (attempt + 1) + int(batch["row"][todo[0]])
            again = self.gen.generate([convs[i] for i in todo], prefix=ANSWER_PREFIX,
                                      temperature=cfg.retry_temperature, seed=seed)
            for i, r in zip(todo, again):
                attempts[i] += 1
                p = parse_terms(r, n)
                if p.valid or len(p.terms) >= len(parsed[i].terms):
                    parsed[i], raws[i] = p, r
        out_terms, valid, source, reasons = [], [], [], []
        for i, p in enumerate(parsed):
            if p.valid:
                out_terms.append(p.terms)
                source.append("llm")
            else:
                lexical = json.loads(batch["lexical"][i]) if "lexical" in batch else []
                if lexical:  # ctg.repair=lexical: CTG's rules without the LLM (computed by the driver)
                    out_terms.append(lexical)
                else:
                    fallback = json.loads(batch["fallback"][i])
                    out_terms.append(repair(p.terms, fallback, str(batch["category"][i]), n))
                source.append("llm+repair")
            valid.append(p.valid)
            reasons.append(p.reason)
        # terms travel as one '\t'-joined string: a column of variable-length lists would be pickled by Ray Data
        return {"item_id": batch["item_id"], "terms": np.array(["\t".join(t) for t in out_terms], dtype=object),
                "raw": np.array([ANSWER_PREFIX + r for r in raws], dtype=object),
                "valid": np.array(valid), "source": np.array(source, dtype=object),
                "attempts": attempts, "reason": np.array(reasons, dtype=object)}


def tid_stats(tids: list[list[str]]) -> dict[str, Any]:
    keys = [tuple(t) for t in tids]
    n = len(keys)
    colliding = colliding_items(keys)
    width = max((len(k) for k in keys), default=0)
    return {
        "items": n, "unique_tids": len(set(keys)), "unique_terms": len({t for k in keys for t in k}),
        "per_position_vocab": [len({k[j] for k in keys if len(k) > j}) for j in range(width)],
        "colliding_items": colliding, "collision_rate": round(colliding / n, 6) if n else 0.0,
    }


def select_items(items: pa.Table, cfg: CTGConfig) -> pa.Table:
    if cfg.limit is None:
        return items
    if cfg.sample:
        rng = np.random.default_rng(cfg.seed)
        idx = np.sort(rng.choice(items.num_rows, size=min(cfg.limit, items.num_rows), replace=False))
        return items.take(pa.array(idx))
    return items.slice(0, cfg.limit)


def ctg(cfg: GrlmConfig) -> dict[str, Any]:
    from grlm_ray.generation import resolve_llm_path

    store = Store(cfg.run.root, cfg.run.s3)
    c = cfg.ctg
    # converts a GGUF once, before any actor starts; the lexical method needs no LLM
    model_path = resolve_llm_path(c.llm) if c.method == "llm" else None

    def body(ctx: StageContext) -> None:
        import time

        from grlm_ray.runtime import actor_pool_kwargs, init_ray

        items = ctx.read("items.parquet", ITEMS, stage="prepare")
        by_id = {r["item_id"]: r for r in items.to_pylist()}
        nbrs: dict[str, list[str]] = {}
        if c.context == "neighbors" and c.num_neighbors > 0:
            nb = ctx.read("neighbors.parquet", NEIGHBORS, stage="neighbors")
            nbrs = dict(zip(nb.column("item_id").to_pylist(), nb.column("neighbor_ids").to_pylist()))
        chosen = select_items(items, c)
        ids = chosen.column("item_id").to_pylist()
        parts = [ids[s:s + c.part_size] for s in range(0, len(ids), c.part_size)]
        pending = [k for k in range(len(parts)) if not ctx.part_done(f"{k:05d}")]
        no_neighbors = sum(1 for i in ids if c.context == "neighbors" and not nbrs.get(i))
        log.info("ctg: %d items in %d parts, %d to do (%s)", len(ids), len(parts), len(pending),
                 "lexical" if c.method == "lexical" else f"{c.llm.backend}, {c.llm.model}")
        t0 = time.time()
        done_items = 0
        lexical = None
        if pending and (c.method == "lexical" or c.repair == "lexical"):
            from grlm_ray.lexical import LexicalTermWriter

            lexical = LexicalTermWriter(items.to_pylist(), nbrs, c.num_terms, c.num_neighbors, c.distinct_terms)
        if pending and c.method == "lexical":
            assert lexical is not None
            from tqdm import tqdm

            for k in tqdm(pending, desc="ctg parts (lexical)", disable=not cfg.ray.progress_bars):
                recs = [{"item_id": i, "terms": "\t".join(lexical.tid(i)), "raw": "", "valid": True,
                         "source": "lexical", "attempts": 1, "reason": "ok"} for i in parts[k]]
                _save_part(ctx, k, recs)
                done_items += len(recs)
        elif pending:
            rows = []
            for k in pending:
                for i in parts[k]:
                    item = by_id[i]
                    ctx_items = [by_id[j] for j in nbrs.get(i, [])[: c.num_neighbors] if j in by_id]
                    rows.append({
                        "row": len(rows), "part": k, "item_id": i, "category": item["category"],
                        "messages": json.dumps(build_messages(item, ctx_items, c)),
                        "fallback": json.dumps([item["title"], item["description"]] + [x["title"] for x in ctx_items]),
                        "lexical": json.dumps(lexical.tid(i) if lexical is not None else []),
                    })
            ray = init_ray(cfg.ray)
            import ray.data

            cpus = int(ray.available_resources().get("CPU", os.cpu_count() or 1))
            # one block per LLM batch: results stream back (and parts get saved) as batches finish, and
            # several workers get work; a single block would hold every result until the very end
            n_blocks = max(1, -(-len(rows) // c.llm.batch_size))
            ds = ray.data.from_items(rows, override_num_blocks=n_blocks).map_batches(
                TermWriter, batch_size=c.llm.batch_size,
                fn_constructor_kwargs={"model_path": model_path, "cfg": c,
                                       "threads": max(1, cpus // c.num_workers)},
                **actor_pool_kwargs(cfg.ray, c.num_workers),
                **({"num_gpus": c.llm.tensor_parallel_size} if c.llm.device.startswith("cuda") else {}))
            buffers: dict[int, list[dict]] = {k: [] for k in pending}
            from tqdm import tqdm

            with tqdm(total=len(rows), desc="ctg items", disable=not cfg.ray.progress_bars) as bar:
                part_of = {r["item_id"]: r["part"] for r in rows}
                for b in ds.iter_batches(batch_format="numpy", batch_size=None):
                    for j in range(len(b["item_id"])):
                        rec = {key: b[key][j] for key in ("item_id", "terms", "raw", "valid", "source", "attempts", "reason")}
                        k = part_of[str(rec["item_id"])]
                        buffers[k].append(rec)
                        if len(buffers[k]) == len(parts[k]):  # a part is complete: save it now
                            _save_part(ctx, k, buffers.pop(k))
                    bar.update(len(b["item_id"]))
                    done_items += len(b["item_id"])
        seconds = time.time() - t0
        tables = [ctx.read_part(f"{k:05d}", "terms_llm.parquet") for k in range(len(parts))]
        llm = pa.concat_tables(tables)
        attempts = llm.column("attempts").to_pylist()
        valid = llm.column("valid").to_pylist()
        first_try = sum(1 for a, v in zip(attempts, valid) if v and a == 1)
        terms_llm = llm.select(["item_id", "terms", "raw", "valid", "source"])
        uncovered = 0
        if c.uncovered == "words" and len(ids) < items.num_rows:
            chosen_set = set(ids)
            rest = [r for r in items.to_pylist() if r["item_id"] not in chosen_set]
            uncovered = len(rest)
            words = []
            for r in rest:
                ctx_titles = [by_id[j]["title"] for j in nbrs.get(r["item_id"], [])[: c.num_neighbors] if j in by_id]
                words.append(repair([], [r["title"], r["description"]] + ctx_titles, r["category"], c.num_terms))
            terms_llm = pa.concat_tables([terms_llm, pa.table({
                "item_id": pa.array([r["item_id"] for r in rest], pa.string()),
                "terms": pa.array(words, pa.list_(pa.string())),
                "raw": pa.array([""] * len(rest), pa.string()),
                "valid": pa.array([False] * len(rest), pa.bool_()),
                "source": pa.array(["words"] * len(rest), pa.string()),
            })])
        ctx.write("terms_llm.parquet", terms_llm, TERMS)
        before = tid_stats(terms_llm.column("terms").to_pylist())
        resolved, report = (resolve_terms_table(terms_llm, items) if c.resolve_collisions
                            else (terms_llm, None))
        ctx.write("terms.parquet", resolved, TERMS)
        after = tid_stats(resolved.column("terms").to_pylist())
        ctx.info.update({
            "method": c.method, "prompt_version": PROMPT_VERSION if c.method == "llm" else None,
            "backend": c.llm.backend if c.method == "llm" else None, "model": c.llm.model if c.method == "llm" else None,
            "context": c.context, "num_terms": c.num_terms, "items": len(ids),
            "legality_rate": round(sum(valid) / len(valid), 4) if valid else 0.0,
            "legality_rate_first_try": round(first_try / len(valid), 4) if valid else 0.0,
            "repaired_items": len(valid) - sum(valid), "items_without_neighbors": no_neighbors,
            "uncovered_items_from_words": uncovered,
            "failure_reasons": dict(Counter(r for r in llm.column("reason").to_pylist() if r != "ok").most_common(8)),
            "before_resolution": before, "after_resolution": after,
            "collisions": report.as_dict() if report else None,
            "generated_items_this_run": done_items, "generation_seconds": round(seconds, 2),
            "items_per_second": round(done_items / seconds, 3) if done_items and seconds > 0 else None,
            "prompt_example": None if c.method == "lexical" else build_messages(by_id[ids[0]], [by_id[j] for j in nbrs.get(ids[0], [])[: c.num_neighbors] if j in by_id], c) if ids else None,
        })

    return run_stage(store, cfg.run.name, STAGE, stage_key(cfg, STAGE), body,
                     resume=cfg.run.resume, after=reads(STAGE, cfg), inputs={"items": store.uri(f"{cfg.run.name}/prepare/items.parquet")})


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
