"""Run storage: a root that is a local directory or ``s3://bucket/prefix``.

Layout: ``<root>/<run>/<stage>/...`` with ``_manifest.json`` per stage. Writes are atomic: a local file
is written beside its target and renamed into place; an S3 object only becomes visible once its upload
completes. A stage is skipped when its manifest says complete for the same config hash; a stage that
stopped half-way keeps its finished parts (``parts/<key>/``) and resumes from them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from grlm_ray import __version__
from grlm_ray.core.config import S3Config
from grlm_ray.core.errors import DataError, GrlmError
from grlm_ray.core.registry import require_output
from grlm_ray.core.schemas import EMBEDDINGS, ArtifactSchema, validate

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"


class Store:
    """A filesystem rooted at a local path or an S3 prefix; paths below are '/'-separated."""

    def __init__(self, root: str, s3: S3Config | None = None) -> None:
        self.root_uri = root.rstrip("/")
        self.is_s3 = root.startswith("s3://")
        if self.is_s3:
            s3 = s3 or S3Config()
            kwargs: dict[str, Any] = {"region": s3.region}
            if s3.endpoint_url:
                scheme, _, host = s3.endpoint_url.partition("://")
                kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
            # Credentials: the AWS SDK default chain (env vars, ~/.aws, instance roles). Never config.
            self.fs: pafs.FileSystem = pafs.S3FileSystem(**kwargs)
            self._base = root[len("s3://"):].rstrip("/")
        elif root.startswith("file://") or "://" not in root:
            self.fs = pafs.LocalFileSystem()
            self._base = os.path.abspath(root.removeprefix("file://"))
        else:
            raise GrlmError(f"unsupported run root {root!r}: use a local path or s3://bucket/prefix")

    def path(self, rel: str) -> str:
        rel = rel.strip("/")
        return f"{self._base}/{rel}" if rel else self._base

    def uri(self, rel: str) -> str:
        return f"s3://{self.path(rel)}" if self.is_s3 else self.path(rel)

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def delete_dir(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_dir(self.path(rel))

    def delete_file(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_file(self.path(rel))

    def upload_dir(self, local_dir: str, rel: str) -> None:
        """Copy a local folder to ``rel`` (file by file, each write atomic), replacing what was there."""
        self.delete_dir(rel)
        for dirpath, _, files in os.walk(local_dir):
            for name in files:
                src = os.path.join(dirpath, name)
                sub = os.path.relpath(src, local_dir).replace(os.sep, "/")
                with open(src, "rb") as f:
                    self.write_bytes(f"{rel}/{sub}", f.read())

    def local_dir(self, rel: str, cache: str, version: str = "") -> str:
        """A local folder holding ``rel``: the path itself on local storage, else a download into ``cache``
        (reused while ``version`` — what tells one write of ``rel`` from the next — is the same)."""
        if not self.is_s3:
            return self.path(rel)
        dest = os.path.join(cache, rel.strip("/").replace("/", "__") + (f"@{version}" if version else ""))
        if os.path.isdir(dest):
            return dest
        tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
        base = self.path(rel)
        for info in self.fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            if info.type == pafs.FileType.File:
                out = os.path.join(tmp, os.path.relpath(info.path, base))
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with self.fs.open_input_stream(info.path) as f, open(out, "wb") as g:
                    g.write(f.read())
        os.replace(tmp, dest)
        return dest

    # -- atomic writes --------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if self.is_s3:
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            return
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{target.rsplit('/', 1)[1]}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError as e:
            raise DataError("file not found", where=self.uri(rel)) from e

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_table(self, rel: str, table: pa.Table, schema: ArtifactSchema | None = None) -> pa.Table:
        if schema is not None:
            table = validate(table, schema, where=f"{self.uri(rel)} (writing)")
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(rel, buf.getvalue())
        return table

    def write_batches(self, rel: str, tables: Iterable[pa.Table], schema: ArtifactSchema | None = None) -> int:
        """``tables`` (one schema) written one after another as one Parquet file, atomically as
        ``write_table`` (local: a temporary file beside the target, renamed; S3: a local temporary file,
        uploaded once complete); none is kept, so the whole table never sits in memory. Each is checked
        against ``schema`` (no unique keys: they need the whole table). Returns the rows written."""
        if schema is not None and schema.unique:
            raise GrlmError(f"write_batches cannot check the unique keys of '{schema.name}': use write_table")
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]
        if self.is_s3:
            local_dir = tempfile.mkdtemp(prefix="grlm-write-")
            tmp = os.path.join(local_dir, target.rsplit("/", 1)[1])
        else:
            self.fs.create_dir(parent, recursive=True)
            tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{target.rsplit('/', 1)[1]}"
        writer, rows = None, 0
        try:
            for t in tables:
                if schema is not None:
                    try:
                        t = validate(t, schema, where=f"{self.uri(rel)} (writing)")
                    except DataError as e:  # the row in the whole artifact
                        raise _from_row(e, rows) from None
                if writer is None:
                    writer = pq.ParquetWriter(tmp, t.schema, compression="zstd")
                writer.write_table(t)
                rows += t.num_rows
            if writer is None:
                raise GrlmError(f"write_batches: nothing to write to {self.uri(rel)} (no table, not even an empty one)")
            writer.close()
            writer = None
            if self.is_s3:
                self.fs.create_dir(parent, recursive=True)
                pafs.copy_files(tmp, target, destination_filesystem=self.fs)
            else:
                os.replace(tmp, target)
        finally:
            if writer is not None:
                writer.close()
            if os.path.exists(tmp):
                os.remove(tmp)
            if self.is_s3:
                shutil.rmtree(local_dir, ignore_errors=True)
        return rows

    def read_table(self, rel: str, schema: ArtifactSchema | None = None, columns: list[str] | None = None) -> pa.Table:
        """``rel`` whole (``columns`` only, when given: the others are never read), checked against
        ``schema``'s columns."""
        where = self.uri(rel)
        if not self.exists(rel):
            raise DataError("file not found", where=where)
        try:
            if columns is not None:
                _require_columns(pq.read_schema(self.path(rel), filesystem=self.fs).names, columns, where)
            table = pq.read_table(self.path(rel), filesystem=self.fs, columns=columns)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot read Parquet: {e}", where=where) from e
        return validate(table, _subset(schema, columns), where=where) if schema is not None else table


    def _parquet_file(self, rel: str) -> pq.ParquetFile:
        """``rel`` opened for reading a part at a time (DataError when missing or not Parquet)."""
        if not self.exists(rel):
            raise DataError("file not found", where=self.uri(rel))
        try:
            return pq.ParquetFile(self.fs.open_input_file(self.path(rel)))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot read Parquet: {e}", where=self.uri(rel)) from e

    def read_batches(self, rel: str, schema: ArtifactSchema | None = None, columns: list[str] | None = None,
                     batch_rows: int = 65536) -> Iterator[pa.Table]:
        """``rel`` as tables of at most ``batch_rows`` rows (``columns`` only, when given), read from the file as
        they are consumed: the whole table is never in memory at once. Each is checked against ``schema``'s
        columns as ``read_table`` checks the whole (DataError with the file's own row); schemas with unique
        keys need the whole table (``read_table``)."""
        if schema is not None and schema.unique:
            raise GrlmError(f"read_batches cannot check the unique keys of '{schema.name}': use read_table")
        where = self.uri(rel)
        f = self._parquet_file(rel)
        schema = _subset(schema, columns)
        empty = f.schema_arrow.empty_table()
        if columns is not None:  # the columns and their types, before any row is read
            _require_columns(empty.column_names, columns, where)
            empty = empty.select(columns)
        if schema is not None:
            validate(empty, schema, where=where)
        start = 0
        for b in f.iter_batches(batch_size=batch_rows, columns=columns):
            t = pa.Table.from_batches([b])
            if schema is not None:
                try:
                    t = validate(t, schema, where=where)
                except DataError as e:
                    raise _from_row(e, start) from None
            start += t.num_rows
            yield t

    def embeddings_shape(self, rel: str) -> tuple[int, int]:
        """(rows, dim) of an embeddings artifact, from its metadata and first row."""
        return self._embeddings_shape(self._parquet_file(rel), self.uri(rel))

    @staticmethod
    def _embeddings_shape(f: pq.ParquetFile, where: str) -> tuple[int, int]:
        n = f.metadata.num_rows
        first = next(f.iter_batches(batch_size=1), None)
        # columns and types, on the first row
        probe = validate(pa.Table.from_batches([first]) if first is not None else f.schema_arrow.empty_table(),
                         EMBEDDINGS, where=where)
        return n, (len(probe.column("embedding")[0]) if n else 0)

    def read_embeddings(self, rel: str, batch_rows: int = 65536, matrix: bool = True
                        ) -> tuple[pa.Array, np.ndarray | None]:
        """(item ids, [n, dim] float32 matrix) of an embeddings artifact, streamed into the matrix a batch
        at a time: the whole table and its concatenated copy never coexist with the matrix (at 1M x 384 the
        table, the copy and the matrix were 1.5 GB each in the neighbours driver: ``grlm bench scale``).
        The contract is checked as ``read_table`` would: ids present and unique, every vector the same
        length, no nulls (DataError with the row). ``matrix=False``: the check and the ids only (None for
        the matrix; one batch in memory at a time)."""
        import pyarrow.compute as pc

        where = self.uri(rel)
        f = self._parquet_file(rel)
        n, dim = self._embeddings_shape(f, where)
        ids = f.read(columns=["item_id"]).column("item_id").cast(pa.string())
        bad_id = pc.or_kleene(pc.is_null(ids), pc.equal(pc.utf8_length(ids), 0))
        if pc.any(bad_id).as_py():
            raise DataError("empty or null item id", where=where, row=int(pc.index(bad_id, True).as_py()),
                            field="item_id")
        if pc.count_distinct(ids).as_py() != n:
            seen: set[str] = set()
            for row, i in enumerate(ids.to_pylist()):
                if i in seen:
                    raise DataError(f"duplicate item id {i!r}", where=where, row=row, field="item_id")
                seen.add(i)
        base = np.empty((n, dim), dtype=np.float32) if matrix else None
        for start, block in self.embedding_blocks(rel, batch_rows, as_arrays=matrix):
            if base is not None:
                base[start:start + len(block)] = block
        return ids.combine_chunks(), base

    def embedding_blocks(self, rel: str, batch_rows: int = 65536, as_arrays: bool = True) -> Iterator[tuple[int, Any]]:
        """(first row, [rows, dim] float32 block) of an embeddings artifact, a batch at a time, each checked
        (every vector present and as long as the first: DataError with the row). ``as_arrays=False``: the
        check only (the block is then the Arrow column)."""
        import pyarrow.compute as pc

        where = self.uri(rel)
        f = self._parquet_file(rel)
        _, dim = self._embeddings_shape(f, where)
        start = 0
        for b in f.iter_batches(batch_size=batch_rows, columns=["embedding"]):
            col = b.column(0)
            bad = pc.or_kleene(pc.is_null(col), pc.not_equal(pc.list_value_length(col), dim))
            if pc.any(bad).as_py():
                row = start + int(pc.index(bad, True).as_py())
                raise DataError(f"embedding missing or not {dim} long", where=where, row=row, field="embedding")
            yield start, (pc.list_flatten(col).to_numpy(zero_copy_only=False).reshape(-1, dim) if as_arrays else col)
            start += len(col)


def release_arrow_memory() -> None:
    """Hand the memory of freed Arrow buffers back to the OS. Arrow's allocator (mimalloc) keeps freed pages
    for reuse: after the evaluation driver dropped its input tables, 0.9 GB of its 3.3 GB at 1M items was
    such pages (``grlm bench scale``). Call it where a stage has dropped large tables."""
    pa.default_memory_pool().release_unused()


def _require_columns(found: list[str], columns: list[str], where: str) -> None:
    absent = [c for c in columns if c not in found]
    if absent:
        raise DataError(f"missing column (found columns: {', '.join(found)})", where=where, field=absent[0])


def _from_row(e: DataError, start: int) -> DataError:
    """``e`` raised on a part of an artifact that starts at row ``start``, with the row in the whole."""
    return DataError(e.message, where=e.where, row=None if e.row is None else e.row + start, field=e.field)


def _subset(schema: ArtifactSchema | None, columns: list[str] | None) -> ArtifactSchema | None:
    """``schema`` restricted to ``columns`` (unique keys kept only when their column is read)."""
    if schema is None or columns is None:
        return schema
    return dataclasses.replace(schema, columns=tuple(c for c in schema.columns if c.name in columns),
                               unique=tuple(k for k in schema.unique if k in columns))


@dataclass
class StageContext:
    """What a stage function gets: where to read and write, and its resumable parts."""

    store: Store
    run: str
    stage: str
    info: dict[str, Any] = field(default_factory=dict)  # goes into the manifest
    outputs: dict[str, int] = field(default_factory=dict)  # artifact -> row count

    def rel(self, name: str) -> str:
        return f"{self.run}/{self.stage}/{name}"

    def stage_rel(self, stage: str, name: str) -> str:
        """Another stage's declared output (``registry.require_output``: a name it does not write is refused)."""
        if stage != self.stage:
            require_output(stage, name)
        return f"{self.run}/{stage}/{name}"

    def write(self, name: str, table: pa.Table, schema: ArtifactSchema | None = None) -> pa.Table:
        table = self.store.write_table(self.rel(name), table, schema)
        self.outputs[name] = table.num_rows
        return table

    def write_batches(self, name: str, tables: Iterable[pa.Table], schema: ArtifactSchema | None = None) -> int:
        rows = self.store.write_batches(self.rel(name), tables, schema)
        self.outputs[name] = rows
        return rows

    def read(self, name: str, schema: ArtifactSchema | None = None, stage: str | None = None,
             columns: list[str] | None = None) -> pa.Table:
        return self.store.read_table(self.stage_rel(stage or self.stage, name), schema, columns)

    def read_if_exists(self, name: str, schema: ArtifactSchema | None = None, stage: str | None = None,
                       columns: list[str] | None = None) -> pa.Table | None:
        """``read``, or None when the stage did not write ``name`` (an optional output)."""
        rel = self.stage_rel(stage or self.stage, name)
        return self.store.read_table(rel, schema, columns) if self.store.exists(rel) else None

    # -- resumable parts: a part is done once its _done marker exists -----------------------
    def part_done(self, key: str) -> bool:
        return self.store.exists(self.rel(f"parts/{key}/_done"))

    def write_part(self, key: str, tables: dict[str, tuple[pa.Table, ArtifactSchema | None]],
                   meta: dict[str, Any] | None = None) -> None:
        for name, (table, schema) in tables.items():
            self.store.write_table(self.rel(f"parts/{key}/{name}"), table, schema)
        self.store.write_json(self.rel(f"parts/{key}/_done"), meta or {})

    def read_part(self, key: str, name: str, schema: ArtifactSchema | None = None) -> pa.Table:
        return self.store.read_table(self.rel(f"parts/{key}/{name}"), schema)

    def part_meta(self, key: str) -> dict[str, Any]:
        return self.store.read_json(self.rel(f"parts/{key}/_done"))


def take_rows(parts: list[pa.RecordBatch], at: np.ndarray, schema: pa.Schema) -> pa.Table:
    """Rows ``at`` of the table made of ``parts``, in that order, taken a part at a time: a take on a chunked
    table concatenates its string columns first (every call copied the whole table: 0.27 s per 64k rows of
    SFT completions at 1M items, quadratic over a stage that gathers it a slice at a time)."""
    bounds = np.cumsum([0] + [b.num_rows for b in parts])
    part = np.searchsorted(bounds, at, side="right") - 1
    order = np.argsort(part, kind="stable")
    cut = np.searchsorted(part[order], np.arange(len(parts) + 1))
    got = [parts[k].take(pa.array(at[order[cut[k]:cut[k + 1]]] - bounds[k]))
           for k in range(len(parts)) if cut[k] < cut[k + 1]]
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    return pa.Table.from_batches(got, schema=schema).combine_chunks().take(pa.array(back))


def read_manifest(store: Store, run: str, stage: str) -> dict[str, Any] | None:
    rel = f"{run}/{stage}/{MANIFEST}"
    return store.read_json(rel) if store.exists(rel) else None


def chained_key(store: Store, run: str, key: str, after: Iterable[str]) -> tuple[str, dict[str, str]]:
    """``key`` chained with the keys of ``run``'s stages ``after`` (their manifests; what ``run_stage`` keys a
    stage by), and those upstream keys."""
    upstream_keys = {s: _chain_key(read_manifest(store, run, s) or {}) for s in after}
    if upstream_keys:
        chained = hashlib.sha256(json.dumps(upstream_keys, sort_keys=True).encode()).hexdigest()[:12]
        key = f"{key}-{chained}"
    return key, upstream_keys


def _chain_key(manifest: dict[str, Any]) -> str:
    """What a downstream stage's key takes from an upstream manifest: its key, and how many times it was
    redone (absent until it is: the keys of runs that never redid a stage stay as they were)."""
    key = str(manifest.get("config_hash", "none"))
    return f"{key}#redo{manifest['generation']}" if manifest.get("generation") else key


def mark_redo(store: Store, run: str, stage: str) -> bool:
    """Have ``stage`` of ``run`` run again next time although it is complete for its config (after a code
    change, or to time it): its folder is cleared then, and every stage downstream of it runs again too, as
    its input changed (the redo count is part of the key they chain). Stages upstream are reused. Returns
    False when the stage has not run yet (nothing to redo)."""
    manifest = read_manifest(store, run, stage)
    if manifest is None:
        return False
    store.write_json(f"{run}/{stage}/{MANIFEST}", {"stage": stage, "status": "redo", "config_hash": None,
                                                   "generation": int(manifest.get("generation") or 0) + 1})
    return True


def copy_stages(store: Store, base: str, run: str, stages: tuple[str, ...] | list[str]) -> list[str]:
    """Copy finished stages of run ``base`` into run ``run`` (variants share upstream work: a copied stage
    is skipped when the variant's config gives it the same hash, recomputed otherwise). A stage the variant
    already holds with the base's hash is left alone; an older copy is replaced. Returns the stages copied."""
    import pyarrow.fs as pafs

    copied = []
    for stage in stages:
        src, dst = f"{base}/{stage}", f"{run}/{stage}"
        have, want = read_manifest(store, run, stage), read_manifest(store, base, stage)
        if not want or want.get("status") != "complete":
            continue
        if have and have.get("status") == "complete" and have.get("config_hash") == want.get("config_hash"):
            continue  # already the same
        if store.exists(dst):
            store.delete_dir(dst)  # an older or half-done copy
        root = store.path(src)
        for info in store.fs.get_file_info(pafs.FileSelector(root, recursive=True)):
            if info.type == pafs.FileType.File:
                target = store.path(f"{dst}/{info.path[len(root) + 1:]}")
                store.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                store.fs.copy_file(info.path, target)
        copied.append(stage)
    return copied


def run_stage(
    store: Store,
    run: str,
    stage: str,
    config_hash: str,
    fn: Callable[[StageContext], None],
    *,
    resume: bool = True,
    inputs: dict[str, str] | None = None,
    after: tuple[str, ...] | list[str] = (),
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``fn`` as stage ``stage`` of ``run`` unless an identical run of it is complete.

    The stage's key chains ``config_hash`` (its own config sections) with the keys of the stages in
    ``after`` (the stages whose outputs it reads, from their manifests): any change upstream re-runs every
    stage downstream of it, and nothing else.
    - complete manifest, same key, resume=True   -> skipped, manifest returned;
    - running manifest, same hash, resume=True   -> resumed: ``fn`` sees the finished parts;
    - otherwise                                  -> the stage folder is cleared and ``fn`` runs.
    ``config``: the config sections the key hashes, recorded in the manifest (what a stage stopped half-way ran
    with, for naming the fields a resubmission changed).
    """
    config_hash, upstream_keys = chained_key(store, run, config_hash, after)
    manifest = read_manifest(store, run, stage)
    generation = (manifest or {}).get("generation")  # how many times it was redone (``mark_redo``)
    if resume and manifest and manifest.get("config_hash") == config_hash:
        if manifest.get("status") == "complete":
            log.info("stage %s: complete for config %s, skipped", stage, config_hash)
            return {**manifest, "skipped": True}
        log.info("stage %s: resuming a run that stopped half-way", stage)
    elif manifest is not None or store.exists(f"{run}/{stage}"):
        store.delete_dir(f"{run}/{stage}")
    started = time.time()
    base = {
        "stage": stage,
        "config_hash": config_hash,
        "upstream": upstream_keys,
        "grlm_version": __version__,
        "inputs": inputs or {},
        **({"config": config} if config is not None else {}),
        "started_at": started,
        **({"generation": generation} if generation else {}),
    }
    store.write_json(f"{run}/{stage}/{MANIFEST}", {**base, "status": "running"})
    ctx = StageContext(store, run, stage)
    fn(ctx)
    final = {
        **base,
        "status": "complete",
        "finished_at": time.time(),
        "seconds": round(time.time() - started, 3),
        "outputs": ctx.outputs,
        "info": ctx.info,
    }
    store.write_json(f"{run}/{stage}/{MANIFEST}", final)
    return {**final, "skipped": False}
