"""The serving catalog: every item with its TID, from a finished run plus items added later (no retraining).

Contract: prepare/items + sft/terms (+ serve/catalog_updates.parquet) -> ``Catalog`` (versioned, immutable;
an update makes a new version). New items get TIDs the way the CTG stage gives them: their text is
embedded with the run's embedding model, their nearest catalog items (cosine, the run's embeddings) are
the context, the CTG LLM writes N terms (parsed, retried, repaired as in ``grlm_ray/stages/ctg.py``), and the
collision rule makes each new TID distinct from every live one. Items added through a terms table
(`reload`) bring their own terms and go through the same collision rule. Updates are saved atomically
to ``<run>/serve/catalog_updates.parquet``, so a restarted app serves them too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from grlm_ray.core.config import GrlmConfig
from grlm_ray.core.errors import DataError
from grlm_ray.core.schemas import CATALOG_UPDATES, EMBEDDINGS, ITEMS, SEQUENCES, TARGETS, TERMS, embedding_matrix
from grlm_ray.core.run import Run
from grlm_ray.lib.generation import resolve_llm_path
from grlm_ray.lib.lexical import LexicalTermWriter
from grlm_ray.lib.models import quiet_loading, resolve_model_path, set_torch_threads
from grlm_ray.lib.protocol import training_popularity
from grlm_ray.lib.termgen import TermWriter, TidJob, statistics_needed, write_tids
from grlm_ray.lib.terms import resolve_collisions
from grlm_ray.lib.textformat import item_text

log = logging.getLogger(__name__)
UPDATES = CATALOG_UPDATES
ITEM_FIELDS = ("item_id", "category", "title", "description", "brand", "categories")
UPDATE_SCHEMA = pa.schema([("item_id", pa.string()), ("category", pa.string()), ("title", pa.string()),
                           ("description", pa.string()), ("brand", pa.string()),
                           ("categories", pa.list_(pa.string())), ("terms", pa.list_(pa.string())),
                           ("source", pa.string()), ("catalog_version", pa.int64())])


ITEM_SCHEMA = pa.schema([f for f in UPDATE_SCHEMA if f.name in ITEM_FIELDS])
TID_SCHEMA = pa.schema([("item_id", pa.string()), ("terms", pa.list_(pa.string()))])


class ArrowMap(Mapping[str, Any]):
    """A read-only ``item_id -> value`` mapping over an Arrow table (one row per item, in catalog order):
    ``value`` names the column whose cell is the value, or None for the whole row as a dict. No Python
    object per item until one is asked for (a dict per item made the catalog 123 MB pickled and ~1 GB
    in memory at 300k items, in the registry and again in every replica: ``grlm bench scale``); it pickles
    as its Arrow columns, and the id index is rebuilt where it is first used."""

    def __init__(self, table: pa.Table, value: str | None, index: dict[str, int] | None = None) -> None:
        self.table, self.value, self._index = table, value, index

    def __getstate__(self) -> dict[str, Any]:
        return {"table": self.table, "value": self.value}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.table, self.value, self._index = state["table"], state["value"], None

    def _idx(self) -> dict[str, int]:
        if self._index is None:
            self._index = {i: n for n, i in enumerate(self.table.column("item_id").to_pylist())}
        return self._index

    def __len__(self) -> int:
        return self.table.num_rows

    def __iter__(self) -> Iterator[str]:
        return iter(self._idx())

    def __contains__(self, key: object) -> bool:
        return key in self._idx()

    def __getitem__(self, key: str) -> Any:
        n = self._idx()[key]
        if self.value is not None:
            return self.table.column(self.value)[n].as_py()
        return self.table.slice(n, 1).to_pylist()[0]

    def values(self) -> list[Any]:  # type: ignore[override]
        """Every value in catalog order, read column-wise (not item by item)."""
        if self.value is not None:
            return self.table.column(self.value).to_pylist()
        return self.table.to_pylist()

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]
        return list(zip(self.table.column("item_id").to_pylist(), self.values()))

    def appended(self, rows: pa.Table) -> "ArrowMap":
        """A new mapping with ``rows`` (new ids) after these; this one is unchanged (versions share columns)."""
        start = self.table.num_rows
        index = dict(self._idx())
        for n, i in enumerate(rows.column("item_id").to_pylist()):
            index[i] = start + n
        return ArrowMap(pa.concat_tables([self.table, rows.cast(self.table.schema)]), self.value, index)


@dataclass(frozen=True)
class Catalog:
    version: int
    items: ArrowMap  # item_id -> metadata (ITEM_FIELDS)
    tids: ArrowMap  # item_id -> terms
    popular: list[str]  # training interaction count, then item id
    added: list[str] = field(default_factory=list)  # items added after training, in order
    added_in: dict[str, int] = field(default_factory=dict)  # added item -> the catalog version that added it

    @property
    def item_ids(self) -> list[str]:
        return list(self.tids)

    def with_items(self, rows: Sequence[dict[str, Any]], version: int | None = None) -> "Catalog":
        """A new version with ``rows`` (item fields + terms; new item ids) added; ``version`` restores a
        saved one."""
        v = self.version + 1 if version is None else version
        if v <= self.version:
            raise ValueError(f"catalog version {v} is not after {self.version}")
        ids = [r["item_id"] for r in rows]
        again = [i for i in ids if i in self.tids] or [i for i in set(ids) if ids.count(i) > 1]
        if again:
            raise ValueError(f"items already in the catalog (or twice in one update): {again[:3]}")
        items = self.items.appended(pa.Table.from_pylist([{k: r.get(k) for k in ITEM_FIELDS} for r in rows],
                                                         schema=ITEM_SCHEMA))
        tids = self.tids.appended(pa.table({"item_id": pa.array(ids, pa.string()),
                                            "terms": pa.array([list(r["terms"]) for r in rows], pa.list_(pa.string()))}))
        added_in = dict(self.added_in)
        for i in ids:
            added_in.setdefault(i, v)
        return Catalog(v, items, tids, self.popular, self.added + ids, added_in)


def load_catalog(cfg: GrlmConfig) -> Catalog:
    """The run's catalog: its items, the TIDs the model was trained with, and saved updates."""
    run = Run.of(cfg)
    for stage, output in (("prepare", "items.parquet"), ("sft", "terms.parquet"), ("train", "model/config.json")):
        if not run.exists(stage, output):
            raise DataError(f"{run.uri(stage, output)} is missing: run `grlm train` (or `grlm demo`) for this "
                            "config before serving it")
    return read_catalog(run)


def read_catalog(run: Run) -> Catalog:
    """The catalog of a run's prepared items and SFT terms (+ saved updates), the model not checked."""
    items = run.read_table("prepare", "items.parquet", ITEMS)
    terms_t = run.read_table("sft", "terms.parquet", TERMS)
    meta = ArrowMap(items.select(list(ITEM_FIELDS)).cast(ITEM_SCHEMA).combine_chunks(), None)
    tids = ArrowMap(terms_t.select(["item_id", "terms"]).cast(TID_SCHEMA).combine_chunks(), "terms")
    seqs = run.read_table("prepare", "sequences.parquet", SEQUENCES)
    targets = run.read_table("prepare", "targets.parquet", TARGETS)
    cat = Catalog(0, meta, tids, training_popularity(seqs, targets))
    updates = run.file(UPDATES)
    if run.store.exists(updates):
        saved = run.store.read_table(updates).to_pylist()
        by_version: dict[int, list[dict[str, Any]]] = {}
        for r in saved:  # files written before versions were saved: one update, version 1
            by_version.setdefault(int(r.get("catalog_version") or 1), []).append(r)
        for v in sorted(by_version):  # the same versions as before the restart
            cat = cat.with_items(by_version[v], version=v)
        log.info("catalog: %d items added after training, version %d (from %s)", len(saved), cat.version,
                 run.store.uri(updates))
    return cat


def save_updates(run: Run, catalog: Catalog) -> None:
    rows = [dict(catalog.items[i], terms=catalog.tids[i], source="update", catalog_version=catalog.added_in.get(i, 1))
            for i in catalog.added]
    run.store.write_table(run.file(UPDATES), pa.Table.from_pylist(rows, schema=UPDATE_SCHEMA))


def validate_new_items(rows: Sequence[dict[str, Any]], catalog: Catalog, *, need_terms: bool) -> list[dict[str, Any]]:
    """Clean rows (defaults for missing text fields) or a DataError naming the row and field."""
    out, seen = [], set()
    for n, r in enumerate(rows):
        where = f"item {n}"
        if not isinstance(r, dict):
            raise DataError(f"{where}: expected an object")
        iid = r.get("item_id")
        if not isinstance(iid, str) or not iid.strip():
            raise DataError(f"{where}: field 'item_id' must be a non-empty string")
        if iid in catalog.tids or iid in seen:
            raise DataError(f"{where}: item_id {iid!r} already exists")
        seen.add(iid)
        clean: dict[str, Any] = {"item_id": iid}
        for k in ("category", "title", "description", "brand"):
            v = r.get(k, "")
            if not isinstance(v, str):
                raise DataError(f"{where} ({iid}): field {k!r} must be a string")
            clean[k] = v
        cats = r.get("categories", [])
        if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
            raise DataError(f"{where} ({iid}): field 'categories' must be a list of strings")
        clean["categories"] = cats
        if not (clean["title"] or clean["description"]):
            raise DataError(f"{where} ({iid}): needs a 'title' or a 'description' to be described")
        if need_terms:
            t = r.get("terms")
            if not isinstance(t, list) or not t or not all(isinstance(x, str) and x and " " not in x for x in t):
                raise DataError(f"{where} ({iid}): field 'terms' must be a non-empty list of single words")
            clean["terms"] = [x.lower() for x in t]  # as generated text is read (eig.parse_generated)
        out.append(clean)
    return out


class CatalogTermWriter:
    """CTG for new items, with its models loaded once: the run's embedder and item embeddings, the CTG LLM
    (``ctg.method: llm``) and the catalog statistics of statistical CTG (kept up to date with the catalog,
    item by item). ``writer(catalog, rows)`` -> rows with ``terms`` and ``source``: embed, nearest catalog
    neighbours (cosine, the run's embeddings), the CTG stage's own ``TermWriter`` (generate, validate,
    seeded retries, repair) or statistical CTG. Serving keeps one resident (``serving.TermWriterDeployment``);
    ``assign_terms`` is the one-shot form."""

    def __init__(self, cfg: GrlmConfig, threads: int = 1) -> None:
        quiet_loading()
        import torch
        from sentence_transformers import SentenceTransformer

        self.cfg = cfg
        emb_t = Run.of(cfg).read_table("embed", "embeddings.parquet", EMBEDDINGS)
        self.base_ids = emb_t.column("item_id").to_pylist()
        self.base = embedding_matrix(emb_t)
        self.threads = max(1, threads)
        torch.set_num_threads(self.threads)
        self.encoder = SentenceTransformer(resolve_model_path(cfg.embed.model), device="cpu")
        self.llm = None
        if cfg.ctg.method == "llm":
            retries = cfg.serve.term_writer_retries
            ctg = cfg.ctg if retries is None else cfg.ctg.model_copy(update={"retries": retries})
            self.llm = TermWriter(resolve_llm_path(cfg.ctg.llm), ctg, threads)
        self.lex = None  # statistical CTG's catalog statistics, built on first use
        self.lex_ids: set[str] = set()

    def _lexical(self, catalog: Catalog, rows: list[dict[str, Any]], nbrs: dict[str, list[str]]) -> list[list[str]]:
        """Statistical CTG's TIDs for ``rows``: statistics over the live catalog plus these rows, exactly as a
        writer built from scratch would have them (the rows are added for the call and taken out again)."""

        c = self.cfg.ctg
        if self.lex is None:
            self.lex = LexicalTermWriter([{**v, "item_id": k} for k, v in catalog.items.items()], {},
                                         c.num_terms, c.num_neighbors, c.distinct_terms,
                                         lead=c.lead)
            self.lex_ids = set(catalog.items)
        else:  # items the catalog gained since the last call
            new = [{**catalog.items[k], "item_id": k} for k in catalog.items if k not in self.lex_ids]
            self.lex.add_items(new)
            self.lex_ids.update(r["item_id"] for r in new)
        self.lex.add_items(rows, nbrs)
        if self.cfg.serve.new_item_terms == "known":  # the words the model was trained to write, first
            self.lex.vocabulary = frozenset(w for t in catalog.tids.values() for w in t)
        try:
            return [self.lex.tid(r["item_id"]) for r in rows]
        finally:
            self.lex.remove_items([r["item_id"] for r in rows])
            self.lex.vocabulary = None

    def __call__(self, catalog: Catalog, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import json

        # serving calls this from a worker thread: its torch thread count is its own (models.set_torch_threads)
        set_torch_threads(self.threads)
        budget = self.cfg.serve.term_writer_budget_s
        deadline = time.monotonic() + budget if budget is not None else None

        c = self.cfg.ctg
        texts = [item_text(r["title"], r["description"], r["categories"], r["brand"], r["category"],
                           self.cfg.embed.max_chars) for r in rows]
        q = self.encoder.encode(texts, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
        k = min(c.num_neighbors, len(self.base_ids))
        nbr_rows = np.argsort(-(q @ self.base.T), axis=1, kind="stable")[:, :k] if k else np.zeros((len(rows), 0), int)
        contexts, examples = [], []
        for r, nb in zip(rows, nbr_rows):
            near = [self.base_ids[j] for j in nb if self.base_ids[j] in catalog.items]
            # as in the stage: no neighbours for context: none; the worked examples are neighbours, here with
            # their live TIDs (the stage shows their statistical ones)
            contexts.append([catalog.items[i] for i in near] if c.context == "neighbors" else [])
            examples.append([(catalog.items[i], catalog.tids[i]) for i in near][: c.few_shot]
                            if c.context == "neighbors" else [])
        lexical: list[list[str]] = [[] for _ in rows]
        if statistics_needed(c, examples_are_statistical=False):
            nbrs = {r["item_id"]: [x["item_id"] for x in ctx] for r, ctx in zip(rows, contexts)}
            lexical = self._lexical(catalog, rows, nbrs)
        # the CTG stage's own dispatch: title words, statistical CTG, or the LLM writer (generate, validate,
        # seeded retries, repair)
        jobs = [TidJob(r, ctx, ex, lex) for r, ctx, ex, lex in zip(rows, contexts, examples, lexical)]
        out = [dict(r, terms=w["terms"], source=w["source"]) for r, w in zip(rows, write_tids(c, jobs, self.llm, deadline))]
        log.info("catalog: CTG wrote TIDs for %d new items: %s", len(out), json.dumps([o["terms"] for o in out])[:300])
        return out


def assign_terms(cfg: GrlmConfig, catalog: Catalog, rows: list[dict[str, Any]], threads: int = 1) -> list[dict[str, Any]]:
    """CTG for new items, one shot (loads the models for this call): see ``CatalogTermWriter``."""
    return CatalogTermWriter(cfg, threads)(catalog, rows)


def distinct_from_catalog(catalog: Catalog, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The collision rule of the CTG stage, with every live TID kept as it is (the model knows them)."""

    live = list(catalog.tids)
    ids = live + [r["item_id"] for r in rows]
    tids = catalog.tids.values() + [r["terms"] for r in rows]
    texts = [""] * len(live) + [f"{r['title']} {r['description']}" for r in rows]
    # resolve_collisions keeps the first member of each group: live items come first, so they keep theirs
    new, changed, _ = resolve_collisions(ids, tids, texts)
    return [dict(r, terms=new[len(live) + n], source=r["source"] + ("+dedup" if changed[len(live) + n] else ""))
            for n, r in enumerate(rows)]
