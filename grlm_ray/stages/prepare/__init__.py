"""Stage 1 — prepare: sources -> catalog (items), chronological sequences, leave-one-out targets.

Contract out (``<root>/<run>/prepare/``): ``items``, ``sequences``, ``targets``, ``rejects``, ``raw_text``
(the source text of every item field cleaned under ``data.clean_text``), when a source provides Term
IDs, ``terms`` (source='provided'), and under ``data.holdout`` (the cold-start protocol) ``holdout_items``:
the items taken out of the catalog and of every history (``core.hold_out``), and ``holdout_targets``: the
validation targets that were held-out items, kept apart (TARGETS rows; no stage trains on them). Each domain
is loaded and filtered as its own resumable part (in parallel as Ray tasks when there are several), then the
parts are merged by mode:

- single: one domain, ids as in the source (unless ``namespace_ids``);
- joint: every domain's items and users namespaced ``<domain>/<id>``, sequences kept per domain;
- cross_domain: users present in both domains; their interactions merged chronologically; the last
  (second last) item of *each* domain is that domain's test (validation) target.

Ordering: by timestamp; equal timestamps by ``tie_break`` (file order, or item id); a source without
timestamps is taken in file order. The rules used are recorded in the manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from grlm_ray.core.config import AmazonRawSource, BundleSource, ByoSource, DataConfig, GrlmConfig, SyntheticSource
from grlm_ray.core.errors import DataError
from grlm_ray.core.runtime import init_ray
from grlm_ray.core.schemas import ITEMS, RAW_TEXT, REJECTS, SEQUENCES, TARGETS, TERMS, check_references
from grlm_ray.core.run import Run
from grlm_ray.core.storage import StageContext
from grlm_ray.stages.prepare import core

log = logging.getLogger(__name__)

STAGE = "prepare"


@dataclass
class DomainData:
    name: str
    items: pa.Table
    interactions: pd.DataFrame
    terms: pa.Table | None
    rejects: list[dict]
    info: dict[str, Any] = field(default_factory=dict)
    raw_text: pa.Table | None = None  # source text of the cleaned item fields


def resolve_path(base_dir: str, p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else Path(base_dir).expanduser() / path


def _source_files(cfg: GrlmConfig, src: Any) -> list[Path]:
    """The files a source reads (none for a synthetic one)."""
    from grlm_ray.stages.prepare.amazon_raw import default_files  # dispatch to the source readers

    if isinstance(src, AmazonRawSource):
        d = resolve_path(cfg.data.base_dir, src.dir)
        rf, mf = default_files(src.category)
        return [resolve_path(str(d), src.reviews_file or rf), resolve_path(str(d), src.meta_file or mf)]
    if isinstance(src, BundleSource):
        d = resolve_path(cfg.data.base_dir, src.dir)
        return [d / "items.parquet", d / "sequences.parquet"]
    if isinstance(src, ByoSource):
        return [resolve_path(cfg.data.base_dir, src.items), resolve_path(cfg.data.base_dir, src.interactions)]
    return []


def check_item_text(cfg: GrlmConfig) -> list[str]:
    """Every domain has item text for CTG to write TIDs from (the CTG stage's declared check): a bundle whose
    items have no title and no category path, or a bring-your-own source with every text column set to null,
    is refused before any work, naming the domain. Where the text is read only by prepare (raw Amazon meta
    files, a BYO table's cells), prepare counts the items without text (``items_with_empty_title``)."""
    import pyarrow.parquet as pq

    problems = []
    for name, src in cfg.data.domains.items():
        if isinstance(src, BundleSource):
            path = resolve_path(cfg.data.base_dir, src.dir) / "items.parquet"
            if not path.is_file():
                continue  # check_sources names the missing file
            cols = [c for c in ("title", "categories") if c in pq.read_schema(path).names]
            table = pq.read_table(path, columns=cols) if cols else None
            has = 0
            if table is not None:
                for row in zip(*(table.column(c).to_pylist() for c in cols)):
                    has += any(bool(v) and (not isinstance(v, str) or v.strip()) for v in row)
            if not has:
                problems.append(f"data.domains.{name}: no item of {path} has text (title or categories: found "
                                f"{', '.join(cols) or 'neither column'}), and CTG writes TIDs from item text "
                                f"(sft.terms=ctg): use the bundle's own TIDs (sft.terms=provided)")
        elif isinstance(src, ByoSource):
            c = src.item_columns
            if not any((c.title, c.description, c.brand, c.category, c.categories)):
                problems.append(f"data.domains.{name}.item_columns: every text column (title, description, "
                                f"brand, category, categories) is null, and CTG writes TIDs from item text")
    return problems


def check_sources(cfg: GrlmConfig) -> list[str]:
    """Every source file a domain names exists, and the domains fit the data mode (the stage's declared
    check: `grlm validate`, and every pipeline run before it starts)."""
    problems = []
    for name, src in cfg.data.domains.items():
        for p in _source_files(cfg, src):
            if not p.is_file():
                problems.append(f"data.domains.{name}: file not found: {p}")
    if len(cfg.data.domains) > 1:
        # two domains reading the same files: every item and user twice, under two namespaces
        seen: dict[tuple[str, ...], str] = {}
        for name, src in cfg.data.domains.items():
            files = tuple(str(p.resolve()) for p in _source_files(cfg, src))
            if files and files in seen:
                problems.append(f"data.domains.{name}: reads the same files as data.domains.{seen[files]} "
                                f"({', '.join(files)}): its items and users would be in the catalog twice, "
                                f"under two namespaces")
            seen.setdefault(files, name)
    if cfg.data.mode == "cross_domain":
        for name, src in cfg.data.domains.items():
            if isinstance(src, BundleSource):
                problems.append(f"data.domains.{name}: cross_domain merges by time; bundles have no timestamps")
    return problems


@dataclass
class _Read:
    """What a source gave before the per-domain rules: items (None: read after filtering), interactions,
    the provided TIDs, whether the k-core / duplicate rules apply, and whether every item stays."""

    items: pa.Table | None
    inter: Any
    terms: pa.Table | None = None
    refilter: bool = True
    keep_all_items: bool = False
    meta: Path | None = None  # AmazonRawSource: its meta file, read for the surviving items only


def _read_source(name: str, src: Any, data: DataConfig, rejects: Any, info: dict[str, Any]) -> _Read:
    """Dispatch to the source's reader."""
    if isinstance(src, SyntheticSource):
        from grlm_ray.stages.prepare.synthetic import generate

        return _Read(*generate(src))
    if isinstance(src, AmazonRawSource):
        from grlm_ray.stages.prepare import amazon_raw

        rf, mf = amazon_raw.default_files(src.category)
        d = resolve_path(data.base_dir, src.dir)
        inter = amazon_raw.read_reviews(resolve_path(str(d), src.reviews_file or rf), rejects)
        info["raw_interactions"] = len(inter)
        return _Read(None, inter, meta=resolve_path(str(d), src.meta_file or mf))
    if isinstance(src, BundleSource):
        from grlm_ray.stages.prepare.bundle import read_bundle

        items, inter, terms = read_bundle(resolve_path(data.base_dir, src.dir), name, rejects, src.description)
        # with_terms=false: the bundle's own TIDs are not wanted (no provided terms table)
        return _Read(items, inter, terms if src.with_terms else None, src.refilter, True)
    if isinstance(src, ByoSource):
        from grlm_ray.stages.prepare import byo

        items = byo.read_items(src, resolve_path(data.base_dir, src.items), rejects)
        inter = byo.read_interactions(src, resolve_path(data.base_dir, src.interactions),
                                      set(items.column("item_id").to_pylist()), rejects)
        return _Read(items, inter, keep_all_items=True)  # cold items stay: they can get TIDs and be recommended
    raise TypeError(type(src))  # pragma: no cover - the config union is closed


def _filter_interactions(name: str, inter: Any, data: DataConfig, refilter: bool, info: dict[str, Any]) -> Any:
    """Order, dedupe, k-core and drop short users (counts in ``info``); no user left is an error."""
    info["interactions_read"] = len(inter)
    has_ts = bool(inter["timestamp"].notna().any())
    info["ordering"] = (f"timestamp, ties by {data.tie_break}" if has_ts
                        else "file order (source has no timestamps)")
    inter = core.order_interactions(inter, data.tie_break if has_ts else "file_order")
    if refilter:
        inter, n_dup = core.drop_duplicate_interactions(inter, data.duplicate_interactions)
        info["duplicate_interactions_dropped"] = n_dup
        n_before_u, n_before_i = inter["user_id"].nunique(), inter["item_id"].nunique()
        inter, rounds = core.k_core(inter, data.k_core)
        info["k_core"] = {"k": data.k_core, "rounds": rounds,
                          "users_dropped": int(n_before_u - inter["user_id"].nunique()),
                          "items_dropped": int(n_before_i - inter["item_id"].nunique())}
    inter, n_short = core.drop_short_users(inter, data.min_user_interactions)
    info["users_below_min_interactions_dropped"] = n_short
    if inter.empty:
        raise DataError(f"domain '{name}': no user has {data.min_user_interactions}+ interactions after "
                        f"filtering (k_core={data.k_core}); nothing to train or evaluate on")
    return inter


def _raw_meta_items(src: AmazonRawSource, meta: Path, used: set[str], rejects: Any, info: dict[str, Any]) -> pa.Table:
    """The surviving items' meta lines; a reviewed item without one stays, with empty text (counted)."""
    from grlm_ray.stages.prepare import amazon_raw

    items = amazon_raw.read_meta(meta, used, src.category, rejects)
    missing = sorted(used - set(items.column("item_id").to_pylist()))
    info["items_without_meta"] = len(missing)
    if not missing:
        return items
    n = len(missing)
    filler = pa.table({"item_id": missing, "category": [src.category] * n, "title": [""] * n,
                       "description": [""] * n, "brand": [""] * n,
                       "categories": pa.array([[]] * n, pa.list_(pa.string())),
                       "source_id": missing}, schema=ITEMS.arrow)
    return pa.concat_tables([items, filler])


def load_domain(name: str, src: Any, data: DataConfig) -> DomainData:
    """Read one source and apply the per-domain rules (dedupe, k-core, short users, ordering)."""
    rejects = core.Rejects(policy=data.invalid_rows)
    info: dict[str, Any] = {"kind": src.kind}
    r = _read_source(name, src, data, rejects, info)
    inter = _filter_interactions(name, r.inter, data, r.refilter, info)
    used = set(inter["item_id"].unique())
    items = _raw_meta_items(src, r.meta, used, rejects, info) if r.meta is not None else r.items
    assert items is not None
    if not r.keep_all_items:
        import pyarrow.compute as pc

        items = items.filter(pc.is_in(items.column("item_id"), value_set=pa.array(sorted(used), pa.string())))
    raw_text = None
    if data.clean_text:
        # once, here, for every source: the embedder, CTG prompts and SFT lines all read these fields
        items, raw_text, cleaned = core.clean_items(items, f"{name} items", rejects)
        info["text_cleaned"] = cleaned  # repaired values per field (rows: rejects, action 'repaired')
    info["items_with_empty_title"] = int(sum(1 for t in items.column("title").to_pylist() if not t))
    return DomainData(name, items, inter, r.terms, rejects.rows, info, raw_text)


def _namespace(d: DomainData, users: bool) -> DomainData:
    import pyarrow.compute as pc

    prefix = f"{d.name}/"
    items = d.items.set_column(0, "item_id", pc.binary_join_element_wise(prefix, d.items.column("item_id"), ""))
    inter = d.interactions.copy()
    inter["item_id"] = prefix + inter["item_id"]
    if users:
        inter["user_id"] = prefix + inter["user_id"]
    terms = None
    if d.terms is not None:
        terms = d.terms.set_column(0, "item_id", pc.binary_join_element_wise(prefix, d.terms.column("item_id"), ""))
    raw = d.raw_text
    if raw is not None:
        raw = raw.set_column(0, "item_id", pc.binary_join_element_wise(prefix, raw.column("item_id"), ""))
    return DomainData(d.name, items, inter, terms, d.rejects, d.info, raw)


def _interactions_table(df: pd.DataFrame) -> pa.Table:
    return pa.table({"user_id": pa.array(df["user_id"], pa.string()), "item_id": pa.array(df["item_id"], pa.string()),
                     "timestamp": pa.array(df["timestamp"].astype("Int64"), pa.int64()),
                     "order": pa.array(df["order"], pa.int64())})


def _interactions_frame(t: pa.Table) -> pd.DataFrame:
    return pd.DataFrame({"user_id": pd.Series(t.column("user_id").to_pylist(), dtype=str),
                         "item_id": pd.Series(t.column("item_id").to_pylist(), dtype=str),
                         "timestamp": pd.Series(t.column("timestamp").to_pylist(), dtype="Int64"),
                         "order": pd.Series(t.column("order").to_pylist(), dtype="int64")})


def _save_part(ctx: StageContext, d: DomainData) -> None:
    tables: dict[str, tuple[pa.Table, Any]] = {
        "items.parquet": (d.items, ITEMS),
        "interactions.parquet": (_interactions_table(d.interactions), None),
        "rejects.parquet": (pa.Table.from_pylist(d.rejects, schema=REJECTS.arrow), REJECTS),
    }
    if d.terms is not None:
        tables["terms.parquet"] = (d.terms, TERMS)
    if d.raw_text is not None:
        tables["raw_text.parquet"] = (d.raw_text, RAW_TEXT)
    ctx.write_part(d.name, tables, meta=d.info)


def _load_part(ctx: StageContext, name: str) -> DomainData:
    terms = None
    if ctx.store.exists(ctx.rel(f"parts/{name}/terms.parquet")):
        terms = ctx.read_part(name, "terms.parquet", TERMS)
    raw = None
    if ctx.store.exists(ctx.rel(f"parts/{name}/raw_text.parquet")):
        raw = ctx.read_part(name, "raw_text.parquet", RAW_TEXT)
    return DomainData(name, ctx.read_part(name, "items.parquet", ITEMS),
                      _interactions_frame(ctx.read_part(name, "interactions.parquet")),
                      terms, ctx.read_part(name, "rejects.parquet", REJECTS).to_pylist(),
                      ctx.part_meta(name), raw)


def _load_pending(cfg: GrlmConfig, ctx: StageContext) -> None:
    data = cfg.data
    pending = [n for n in data.domains if not ctx.part_done(n)]
    done = [n for n in data.domains if n not in pending]
    if done:
        log.info("prepare: %d domain(s) already done, resuming: %s", len(done), ", ".join(done))
    if len(pending) > 1:
        ray = init_ray(cfg.ray)
        task = ray.remote(num_cpus=1)(load_domain)
        refs = {task.remote(n, data.domains[n], data): n for n in pending}
        from tqdm import tqdm

        with tqdm(total=len(refs), desc="prepare domains", disable=not cfg.ray.progress_bars) as bar:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                name = refs.pop(ready[0])
                _save_part(ctx, ray.get(ready[0]))  # each domain is saved as it lands: resumable
                bar.update(1)
                bar.set_postfix_str(name)
    else:
        for n in pending:
            _save_part(ctx, load_domain(n, data.domains[n], data))


def _merge(cfg: DataConfig, parts: list[DomainData]) -> tuple[pa.Table, pa.Table, pa.Table, dict[str, Any]]:
    info: dict[str, Any] = {}
    if cfg.mode != "cross_domain":
        seqs, targets = [], []
        for d in parts:
            s = core.build_sequences(d.interactions, cfg.max_sequence_length)
            seqs.append(s)
            targets.append(core.leave_one_out_targets(s, d.name))
        items = pa.concat_tables([d.items for d in parts])
        return items, pa.concat_tables(seqs), pa.concat_tables(targets), info

    a, b = parts
    for d in parts:
        if not d.interactions["timestamp"].notna().all():
            raise DataError(f"cross_domain merges by time, but domain '{d.name}' has interactions without "
                            f"timestamps (a prepared bundle has none): use raw files or your own data")
    common = set(a.interactions["user_id"]) & set(b.interactions["user_id"])
    info["users_in_both_domains"] = len(common)
    frames = []
    for rank, d in enumerate(parts):
        f = d.interactions[d.interactions["user_id"].isin(common)].copy()
        f["domain_rank"] = rank
        frames.append(f)
    merged = pd.concat(frames, ignore_index=True)
    # equal timestamps across domains: first domain of the config first, then file order
    merged = merged.sort_values(["user_id", "timestamp", "domain_rank", "order"], kind="stable")
    if cfg.max_sequence_length:
        merged = merged.groupby("user_id", sort=False).tail(cfg.max_sequence_length)
    per_dom = merged.groupby(["user_id", "domain_rank"]).size().unstack(fill_value=0)
    ok_users = per_dom.index[(per_dom >= 3).all(axis=1)]
    info["users_dropped_fewer_than_3_per_domain"] = int(len(per_dom) - len(ok_users))
    merged = merged[merged["user_id"].isin(set(ok_users))].drop(columns="domain_rank")
    if merged.empty:
        raise DataError("cross_domain: no user has 3+ interactions in both domains")
    seqs = core.build_sequences(merged.reset_index(drop=True))
    targets = core.per_domain_targets(seqs, [d.name for d in parts])
    items = pa.concat_tables([d.items for d in parts])
    return items, seqs, targets, info


def prepare(cfg: GrlmConfig) -> dict[str, Any]:
    """Run (or skip / resume) stage 1 for ``cfg``; returns the stage manifest."""

    def body(ctx: StageContext) -> None:
        data = cfg.data
        _load_pending(cfg, ctx)
        parts = [_load_part(ctx, n) for n in data.domains]
        if data.namespaced:
            parts = [_namespace(d, users=data.mode != "cross_domain") for d in parts]
        items, seqs, targets, merge_info = _merge(data, parts)
        where = ctx.store.uri(ctx.rel("sequences.parquet"))
        check_references(seqs, items, where=where)
        seen: set[str] | None = None
        if data.holdout.share > 0:  # cold start: the held-out items leave everything training reads
            h = data.holdout
            ho = core.hold_out(items, seqs, targets, h.share, h.candidates, h.seed, data.min_user_interactions)
            items, seqs, targets = ho.items, ho.sequences, ho.targets
            seen = set(items.column("item_id").to_pylist())
            ctx.write("holdout_items.parquet", ho.held, ITEMS)
            ctx.write("holdout_targets.parquet", ho.arrival_targets, TARGETS)
            ctx.info["holdout"] = ho.info
            log.info("prepare: cold start: %d of %d items held out (%s), %d test targets new, %d validation targets "
                     "new (kept apart), %d users dropped", ho.info["held_out_items"], ho.info["items"],
                     ho.info["arrival"], ho.info["test_targets_new"], ho.info["valid_targets_new"],
                     ho.info["users_dropped_below_min"])
        ctx.write("items.parquet", items, ITEMS)
        ctx.write("sequences.parquet", seqs, SEQUENCES)
        ctx.write("targets.parquet", targets, TARGETS)
        terms = [d.terms for d in parts if d.terms is not None]
        if terms:
            provided = pa.concat_tables(terms)
            if seen is not None:  # a held-out item's provided TID is not known before it arrives
                import pyarrow.compute as pc

                provided = provided.filter(pc.is_in(provided.column("item_id"),
                                                    value_set=pa.array(sorted(seen), pa.string())))
            ctx.write("terms.parquet", provided, TERMS)
        raw = [d.raw_text for d in parts if d.raw_text is not None]
        ctx.write("raw_text.parquet", pa.concat_tables(raw) if raw else RAW_TEXT.arrow.empty_table(), RAW_TEXT)
        rejects = [r for d in parts for r in d.rejects]
        ctx.write("rejects.parquet", pa.Table.from_pylist(rejects, schema=REJECTS.arrow), REJECTS)
        counts = core.Rejects(rows=rejects).counts()
        ctx.info.update({
            "mode": data.mode, "namespaced_ids": data.namespaced, "tie_break": data.tie_break,
            "duplicate_interactions": data.duplicate_interactions, "k_core": data.k_core,
            "min_user_interactions": data.min_user_interactions,
            "domains": {d.name: d.info for d in parts}, "merge": merge_info, "rejects": counts,
        })

    return Run.of(cfg).run_stage(STAGE, body, inputs={n: s.model_dump_json() for n, s in cfg.data.domains.items()})
