"""Stage 5 — evaluation: beam search on the fine-tuned model, EIG grounding, Recall/NDCG/VR/DHR.

Contract: prepare/{items, sequences, targets} + sft/terms + train/model -> eval/predictions.parquet and
eval/metrics.json (overall and per domain, the protocol choices, and popularity on the same users).

Users are sharded over a Ray Data actor pool; each actor holds the model, the token trie of every
catalog TID (constrained decoding) and the TID index (EIG). The history of a target is every item
before its position in the user's sequence (the last ``sft.max_history``), written with the same text
format as training (``grlm_ray/lib/textformat.py``); only the TID is generated, ended by `` |``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from grlm_ray.core.config import GrlmConfig
from grlm_ray.core.registry import reads, stage_key
from grlm_ray.core.runtime import actor_pool_kwargs, init_ray
from grlm_ray.core.schemas import CATALOG_UPDATES, ITEMS, PREDICTIONS, SEQUENCES, TARGETS, TERMS
from grlm_ray.core.errors import GrlmError
from grlm_ray.core.run import Run, member_model_dirs, member_runs
from grlm_ray.core.storage import StageContext, chained_key, read_manifest, release_arrow_memory, take_rows
from grlm_ray.lib.decoding import TidDecoder, check_ensemble, effective_max_new_tokens, tid_token_arrays
from grlm_ray.lib.eig import TextNeighbours, TidIndex, fill_content, merge_beams, placement_depth, tid_text
from grlm_ray.lib.embeddings import catalog_embeddings
from grlm_ray.lib.metrics import RankingSums
from grlm_ray.lib.models import load_tokenizer, quiet_loading
from grlm_ray.lib.protocol import last_history_items, query_table, target_rows, training_popularity

log = logging.getLogger(__name__)
STAGE = "eval"


class Recommender:
    """Ray Data callable class: prompts -> beams -> grounded ranked lists (one model copy per actor)."""

    def __init__(self, model_dir: str, item_ids: list[str], tids: list[list[str]], fallback: list[str],
                 options: dict[str, Any], added: int = 0) -> None:
        """``added``: the last ``added`` of ``tids`` are items added after training; with
        ``options["added_beams"]`` a second search over only them joins the main beams (``merge_beams``)."""

        self.o = options
        self.decoder = TidDecoder(model_dir, [tid_text(t) for t in tids], backend=options["backend"],
                                  constrained=options["constrained"], num_beams=options["num_beams"],
                                  max_new_tokens=options["max_new_tokens"], threads=int(options.get("threads", 1)),
                                  dtype=options.get("dtype", "float32"), device=options.get("device", "cpu"),
                                  renormalize=bool(options.get("renormalize", False)),
                                  ensemble=options.get("ensemble", ()))
        self.index = TidIndex(item_ids, tids, decay=options["decay"], match=options["match"], fallback_order=fallback)
        self.added = None
        if added and options.get("added_beams"):
            self.added = self.decoder.restricted([tid_text(t) for t in tids[-added:]], options["added_beams"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        prompts = [str(p) for p in batch["prompt"]]
        if self.added is None:
            beams = self.decoder(prompts, batch_size=len(prompts))
        else:
            main = self.decoder(prompts, batch_size=len(prompts), with_scores=True)
            extra = self.added(prompts, batch_size=len(prompts), with_scores=True)
            beams = [merge_beams(m, x, float(self.o["added_bonus"])) for m, x in zip(main, extra)]
        ranked, how, cands, valid = [], [], [], []
        for texts in beams:
            g = self.index.rank(texts, self.o["k"])
            ranked.append("\t".join(g.items))
            how.append("\t".join(g.grounded_by))
            cands.append("\t".join(texts))
            valid.append("\t".join("1" if self.index.is_valid(x) else "0" for x in texts))
        return {"row": batch["row"], "ranked": np.array(ranked, dtype=object), "how": np.array(how, dtype=object),
                "candidates": np.array(cands, dtype=object), "valid": np.array(valid, dtype=object)}


ANSWERS = ("ranked", "how", "candidates", "valid")  # what a Recommender returns per user (tab-joined)


WINDOW = 65536  # users: prompts are ordered by length inside windows of this many, answers flushed a window at a time


def length_order(lengths: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """Query rows by prompt length (then row) inside consecutive windows of ``window`` rows, windows in order:
    a batch's users have similar lengths (less left padding), and a window's answers are all in before the
    next window's start, so the driver holds one window's answers, not every user's."""
    n = len(lengths)
    return np.concatenate([np.zeros(0, np.int64)] + [
        s + np.lexsort((np.arange(min(n, s + window) - s), lengths[s:s + window])) for s in range(0, n, window)])


def write_predictions(ctx: StageContext, queries: pa.Table, answers: Iterable[pa.RecordBatch], popular: list[str],
                      ks: Sequence[int], window: int = WINDOW, rerank: Any = None,
                      namespaced: bool = False) -> tuple[dict, dict]:
    """predictions.parquet in query order and the model's and popularity's metrics (``RankingSums``),
    written and scored a window of ``window`` query rows at a time as soon as all of its answers are in
    (answers carry their ``row``; any order works, window-major order keeps one window in memory). The
    answers stay Arrow strings: no Python object per user or per ranked item (the row dicts this replaced
    were several GB at 1.87M users). ``rerank(first_row, ranked, grounded_by)``: a change to each window's lists
    before they are scored and written (``eval.added_neighbours``)."""
    import pyarrow.compute as pc

    n = queries.num_rows
    n_windows = -(-n // window) if n else 0
    need = [min(n, (w + 1) * window) - w * window for w in range(n_windows)]
    have = [0] * n_windows
    pending: dict[int, list[pa.RecordBatch]] = {w: [] for w in range(n_windows)}
    schema = pa.schema([("row", pa.int64())] + [(k, pa.string()) for k in ANSWERS])
    model = RankingSums(ks, with_valid=True, namespaced=namespaced)
    pop = RankingSums(ks, with_valid=False, namespaced=namespaced)
    top = pa.array([popular[: max(ks)]], pa.list_(pa.string()))

    def window_table(w: int) -> pa.Table:
        q = queries.slice(w * window, need[w])
        parts = pending.pop(w)
        got = np.concatenate([b.column(0).to_numpy() for b in parts]) - w * window
        at = np.full(need[w], -1, np.int64)
        at[got] = np.arange(len(got))
        if len(got) != need[w] or (at < 0).any():
            raise GrlmError(f"evaluation users {w * window}..{w * window + need[w] - 1}: {len(got)} answers for "
                            f"{need[w]} users (one each expected)")
        a = take_rows(parts, at, schema)
        split = {k: pc.split_pattern(a.column(k), "\t") for k in ANSWERS}
        flags = split["valid"].combine_chunks()
        offs = flags.offsets.to_numpy() - flags.offsets[0].as_py()
        valid = pa.ListArray.from_arrays(pa.array(offs), pc.equal(pc.list_flatten(flags), "1"))
        if rerank is not None:
            split["ranked"], split["how"] = rerank(w * window, split["ranked"], split["how"])
        model.add(q.column("domain"), q.column("target_item_id"), split["ranked"], split["how"], valid)
        none = pa.ListArray.from_arrays(pa.array(np.zeros(len(q) + 1, np.int32)), pa.array([], pa.string()))
        pop.add(q.column("domain"), q.column("target_item_id"), top.take(pa.array(np.zeros(len(q), np.int64))), none)
        return pa.table({"user_id": q.column("user_id"), "split": q.column("split"), "domain": q.column("domain"),
                         "target_item_id": q.column("target_item_id"), "candidates": split["candidates"],
                         "ranked_item_ids": split["ranked"], "grounded_by": split["how"]})

    def windows() -> Iterator[pa.Table]:
        done = 0  # windows written, in order
        for b in answers:
            rows = b.column(0).to_numpy()
            if len(rows) and (rows.min() < 0 or rows.max() >= n):
                raise GrlmError(f"an answer for evaluation row {int(rows.max())} of {n}")
            win = rows // window
            for w in np.unique(win).tolist():
                if w < done:
                    raise GrlmError(f"a second answer for an evaluation user of window {w} (already written)")
                pick = np.flatnonzero(win == w)
                pending[w].append(b if len(pick) == len(rows) else b.take(pa.array(pick)))
                have[w] += len(pick)
            while done < n_windows and have[done] >= need[done]:
                yield window_table(done)
                done += 1
        if done < n_windows:
            raise GrlmError(f"evaluation users from row {done * window}: {sum(have[done:])} answers for "
                            f"{n - done * window} users (one each expected)")
        if not n:
            yield PREDICTIONS.arrow.empty_table()

    ctx.write_batches("predictions.parquet", windows(), PREDICTIONS)
    return model.result(), pop.result()


def added_items(run: Run) -> pa.Table:
    """(item_id, terms) of the items added to ``run``'s catalog after training (``serve/catalog_updates.parquet``,
    written by the serving app's admin updates and the cold-start benchmark), in the order they were added."""
    rel = run.file(CATALOG_UPDATES)
    if not run.store.exists(rel):
        raise GrlmError(f"eval.added_items=true but {run.store.uri(rel)} does not exist: add items first "
                        "(POST /v1/admin/items on the served run, or grlm bench cold-start)")
    return run.store.read_table(rel).select(["item_id", "terms"])


def _reranker(cfg: GrlmConfig, run: Run, seqs: pa.Table, targets: pa.Table, added: bool) -> Any:
    """A ``rerank`` for ``write_predictions`` (None when there is nothing to change): each user's added
    neighbours placed (``eval.added_neighbours``: first or last, ``eval.added_position``; the anchor the user's
    last history item or the model's top item), then the list's last places filled with the catalog's text
    neighbours of the user's last item (``eval.content_fill``). ``TextNeighbours``: the run's text embeddings,
    the added items embedded now. A moved item keeps its ``grounded_by``; a placed one is ``added_neighbour``,
    a filled one ``content_neighbour``."""
    e = cfg.eval
    place, fill = bool(e.added_neighbours and added), e.content_fill > 0
    if not (place or fill):
        return None
    rows = run.store.read_table(run.file(CATALOG_UPDATES)).to_pylist() if added else []
    if not run.store.exists(run.rel("embed", "embeddings.parquet")):
        raise GrlmError(f"eval.{'content_fill' if fill else 'added_neighbours'} places items by their text "
                        f"embeddings, and {run.store.uri(run.rel('embed', 'embeddings.parquet'))} does not exist: "
                        "run the embed stage first (`grlm embed CONFIG`)")
    ids, emb = catalog_embeddings(cfg, rows)
    placer = TextNeighbours(ids, emb, [r["item_id"] for r in rows]) if place else None
    every = TextNeighbours(ids, emb, ids) if fill or (place and e.added_within) else None  # the whole catalog
    content = every if fill else None
    # in query order: the queries are these target rows, in this order
    last = last_history_items(seqs, target_rows(targets, e.split, e.limit_users, e.seed)) \
        if fill or e.added_anchor == "last" else []

    def step(r: list, h: list, new: list, tag: str) -> tuple[list, list]:
        was = [dict(zip(old, oh)) for old, oh in zip(r, h)]  # each list's grounded_by by item, once
        return new, [[w.get(i, tag) for i in lst] for w, lst in zip(was, new)]

    def rerank(first: int, ranked: Any, how: Any) -> tuple[pa.Array, pa.Array]:
        r, h = ranked.to_pylist(), how.to_pylist()
        users = last[first:first + len(r)]
        if placer is not None:
            anchors = users if e.added_anchor == "last" else [x[0] if x else None for x in r]
            floors = every.floors(anchors, e.added_within) if e.added_within and every is not None else None
            r, h = step(r, h, placer.place(r, anchors, e.added_min_cosine, e.added_neighbours, e.added_position,
                                           floors, placement_depth(e.content_depth, e.content_fill) if fill else None),
                        "added_neighbour")
        if content is not None:
            r, h = step(r, h, [fill_content(x, c, e.content_fill, e.content_depth)
                               for x, c in zip(r, content.ranked(users, e.content_depth))], "content_neighbour")
        return pa.array(r, pa.list_(pa.string())), pa.array(h, pa.list_(pa.string()))

    return rerank


def _options(e: Any, tok: Any, tids: list[list[str]], cpus: int, others: Sequence[str] = ()) -> dict[str, Any]:
    """What each ``Recommender`` actor decodes and grounds with (``eval.*``; the token budget of a
    constrained search cut to the longest catalog TID)."""
    max_new = e.max_new_tokens
    if e.constrained:
        max_new = effective_max_new_tokens(tid_token_arrays(tok, map(tid_text, tids))[1], max_new)
    return {"constrained": e.constrained, "num_beams": e.num_beams, "max_new_tokens": max_new,
            "backend": e.backend, "dtype": e.dtype, "device": "cuda" if e.use_gpu else "cpu",
            "renormalize": e.scores_renormalized(),
            "k": max(e.ks), "decay": e.decay, "match": e.match, "threads": max(1, cpus // e.num_workers),
            "added_beams": e.added_beams, "added_bonus": e.added_bonus, "ensemble": list(others)}


def _length_ordered(queries: pa.Table, tok: Any) -> pa.Table:
    """(row, prompt) of every query, users of similar prompt length next to each other (``length_order``):
    a batch has less left padding; rows keep their ids. Token counts a chunk at a time (only lengths kept)."""
    n_users = queries.num_rows
    prompts = queries.column("prompt")
    lengths = np.concatenate([np.zeros(0, np.int64)] + [
        np.fromiter(map(len, tok(prompts.slice(s, 8192).to_pylist(), add_special_tokens=False)["input_ids"]),
                    np.int64) for s in range(0, n_users, 8192)])
    return queries.select(["row", "prompt"]).take(pa.array(length_order(lengths)))


def _weights_stamp(folders: Sequence[str]) -> list[list[Any]]:
    """(file, size, mtime) of each folder's weight files: what tells a retrained member from the one scored."""
    out = []
    for folder in folders:
        if os.path.isdir(folder):
            for f in sorted(os.listdir(folder)):
                if f.endswith((".safetensors", ".bin")):
                    st = os.stat(os.path.join(folder, f))
                    out.append([os.path.abspath(os.path.join(folder, f)), st.st_size, st.st_mtime_ns])
    return out


def _decode(cfg: GrlmConfig, store: Any, rel: str, queries: pa.Table, tok: Any, model_dir: str, ids: list[str],
            tids: list[list[str]], popular: list[str], others: Sequence[str], added: pa.Table | None) -> tuple[float, int]:
    """Every query's beams, grounded (``Recommender`` actors over Ray Data), written as they come to ``rel``
    (row + ``ANSWERS``, atomically). Returns (seconds, the effective new-token budget)."""
    from tqdm import tqdm

    e = cfg.eval
    ray = init_ray(cfg.ray)
    import ray.data

    cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    options = _options(e, tok, tids, cpus, others)
    n_users = queries.num_rows
    ordered = _length_ordered(queries, tok)
    n_blocks = max(1, -(-n_users // e.batch_size))
    step = -(-n_users // n_blocks) if n_users else 1
    ds = ray.data.from_arrow([ordered.slice(s, step) for s in range(0, max(n_users, 1), step)]).map_batches(
        Recommender, batch_size=e.batch_size,
        fn_constructor_kwargs={"model_dir": model_dir, "item_ids": ids, "tids": tids,
                               "fallback": popular, "options": options,
                               "added": added.num_rows if added is not None else 0},
        **actor_pool_kwargs(cfg.ray, e.num_workers, num_gpus=1 if e.use_gpu else 0))
    # blocks come back in the order they were cut (window by window): a window's answers are all in before the
    # next window's start (what write_predictions reads them back by)
    ds.context.execution_options.preserve_order = True
    del ordered
    schema = pa.schema([("row", pa.int64())] + [(k, pa.string()) for k in ANSWERS])
    t0 = time.time()

    def answers() -> Iterator[pa.Table]:  # as Arrow strings, as they come
        with tqdm(total=n_users, desc="eval users", disable=not cfg.ray.progress_bars) as bar:
            for b in ds.iter_batches(batch_format="numpy", batch_size=None):
                bar.update(len(b["row"]))
                yield pa.table({"row": pa.array(b["row"].astype(np.int64)), **{
                    k: pa.array(b[k].tolist(), pa.string()) for k in ANSWERS}}, schema=schema)
        if not n_users:
            yield schema.empty_table()

    store.write_batches(rel, answers())
    return time.time() - t0, options["max_new_tokens"]


# eval.* fields that only re-rank the decoded lists: evaluations that differ only in them decode once
RERANK_FIELDS = ("added_neighbours", "added_min_cosine", "added_position", "added_anchor", "added_within",
                 "content_fill", "content_depth")


def decode_key(cfg: GrlmConfig, run: Run, suffix: str) -> str:
    """The key of an evaluation's decoded beams: its stage key without ``RERANK_FIELDS`` (+ ``suffix``: the added
    items and ensemble members), chained with the stages it reads as the stage's own key is."""
    data = cfg.model_dump(mode="json")
    data["eval"].update({f: type(cfg.eval).model_fields[f].default for f in RERANK_FIELDS})
    plain = GrlmConfig.model_validate(data)
    return chained_key(run.store, run.name, stage_key(plain, STAGE) + suffix, reads(STAGE, cfg))[0]


def evaluate_stage(cfg: GrlmConfig) -> dict[str, Any]:
    run = Run.of(cfg)
    e = cfg.eval

    def body(ctx: StageContext) -> None:
        quiet_loading()
        items = ctx.read("items.parquet", ITEMS, stage="prepare", columns=["item_id", "title"])  # for the lines
        seqs = ctx.read("sequences.parquet", SEQUENCES, stage="prepare")
        targets = ctx.read("targets.parquet", TARGETS, stage="prepare")
        terms_t = ctx.read("terms.parquet", TERMS, stage="sft")
        model_dir = run.local_dir("train", "model", os.path.expanduser("~/.cache/grlm-ray/eval"))
        tok = load_tokenizer(model_dir)
        others = member_model_dirs(cfg, os.path.expanduser("~/.cache/grlm-ray/eval-members")) + list(e.ensemble)
        try:  # before any decoding (each actor's TidDecoder checks again)
            check_ensemble(others, tok)
        except ValueError as err:
            raise GrlmError(str(err)) from None
        queries = query_table(cfg, items, seqs, targets, terms_t, tok, history=False)  # Arrow: no row dicts
        popular = training_popularity(seqs, targets)
        rerank = _reranker(cfg, run, seqs, targets, added is not None)
        del items, seqs, targets
        release_arrow_memory()
        ids, tids = terms_t.column("item_id").to_pylist(), terms_t.column("terms").to_pylist()
        if added is not None:  # items added after training: their TIDs join the trie and the index
            ids += added.column("item_id").to_pylist()
            tids += added.column("terms").to_pylist()
            ctx.info["added_items"] = added.num_rows
        renormalize = e.scores_renormalized()
        n_users = queries.num_rows
        if run.store.exists(f"{decoded}/info.json"):  # an earlier evaluation decoded these users with this model
            done = run.store.read_json(f"{decoded}/info.json")
            if done["users"] != n_users:
                raise GrlmError(f"{run.store.uri(decoded)} holds the beams of {done['users']} users, this "
                                f"evaluation has {n_users}: delete that folder and evaluate again")
            max_new, seconds = done["max_new_tokens_effective"], done["seconds"]
            log.info("stage eval: the beams of these %d users were decoded by an earlier evaluation with the same "
                     "model and settings (%s, %.0f s): only the re-ranking runs", n_users, run.store.uri(decoded),
                     seconds)
            ctx.info["decoded_reused"] = {"from": run.store.uri(decoded), "seconds": seconds}
        else:
            seconds, max_new = _decode(cfg, run.store, f"{decoded}/answers.parquet", queries, tok, model_dir,
                                       ids, tids, popular, others, added)
            run.store.write_json(f"{decoded}/info.json", {"users": n_users, "seconds": round(seconds, 3),
                                                          "max_new_tokens_effective": max_new, "run": run.name})
        queries = queries.select(["row", "user_id", "split", "domain", "target_item_id"])
        answers = (b for t in run.store.read_batches(f"{decoded}/answers.parquet", batch_rows=WINDOW)
                   for b in t.to_batches())
        metrics, baseline = write_predictions(ctx, queries, answers, popular, e.ks, rerank=rerank,
                                              namespaced=cfg.data.namespaced and len(cfg.data.domains) > 1)
        report = {"model": metrics, "popularity": baseline, "protocol": {
            "split": e.split, "users": n_users, "sample": e.limit_users, "seed": e.seed,
            "history_masked": False, "num_beams": e.num_beams, "max_new_tokens": e.max_new_tokens,
            "max_new_tokens_effective": max_new,
            "constrained": e.constrained, "grounding": {"match": e.match, "decay": e.decay},
            "added_items": added.num_rows if added is not None else 0,
            "added_search": {"beams": e.added_beams, "bonus": e.added_bonus} if e.added_beams else None,
            "added_neighbours": {"slots": e.added_neighbours, "min_cosine": e.added_min_cosine,
                                 "position": e.added_position, "within": e.added_within or None,
                                 "anchor": e.added_anchor} if e.added_neighbours else None,
            "content_fill": {"slots": e.content_fill, "depth": e.content_depth,
                             "anchor": "last history item", "pool": "catalog"} if e.content_fill else None,
            "ties": "catalog order", "fill": "popularity (training interactions)", "ks": list(e.ks),
            "padding": "left", "dtype": e.dtype, "backend": e.backend,
            "ensemble": ({"models": 1 + len(others), "others": list(others), "members": cfg.train.members,
                          "scores": "mean of the models' next-token log-probs"} if others else None),
            "scores": "log-probs renormalized over allowed tokens" if renormalize and e.constrained
            else "model log-probs", "length_penalty": 1.0, "early_stopping": True}}
        ctx.store.write_json(ctx.rel("metrics.json"), report)
        ctx.info.update({"metrics": metrics["overall"], "popularity": baseline["overall"],
                         "per_domain": metrics["per_domain"], "protocol": report["protocol"],
                         "seconds_generation": round(seconds, 2),
                         "users_per_second": round(n_users / seconds, 3) if seconds > 0 else None})

    suffix, added = "", None  # the stage key's additions: the added items, the ensemble's members
    if e.added_items:
        added = added_items(run)
        suffix += "-added-" + hashlib.sha256(json.dumps([added.column("item_id").to_pylist(),
                                                         added.column("terms").to_pylist()]).encode()).hexdigest()[:12]
    # the other models: train.members' runs (members stage; known by their train manifests, downloaded from an
    # S3 root only when the stage runs) and eval.ensemble's folders (by their weight files)
    members, others = member_runs(cfg), list(e.ensemble)
    if members or others:  # a member retrained is a new ensemble
        trained = {m: read_manifest(run.store, m, "train") or {} for m in members}
        stamp = [[m, t.get("config_hash"), t.get("generation"), t.get("finished_at")] for m, t in trained.items()]
        stamp += _weights_stamp(others)
        suffix += "-ens-" + hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:12]
    # the beams, in <root>/_cache/decoded-<key>/: an evaluation that only re-ranks differently reuses them
    key, decoded = stage_key(cfg, STAGE) + suffix, f"_cache/decoded-{decode_key(cfg, run, suffix)}"
    # the key chains the trained model's (and so every upstream stage's): a new model is re-evaluated
    return run.run_stage(STAGE, body, key=key, inputs={"model": ("train", "model")})
