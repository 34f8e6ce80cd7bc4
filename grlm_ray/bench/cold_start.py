"""Cold-start benchmark: are items that did not exist at training time recommended to the users who buy them?

Contract: a config with ``data.holdout.share > 0`` -> runs that share upstream work -> one table (printed) and
``<bench.out_dir>/cold_start_<dataset>.json`` (+ a plot and the machine description).

    <run>                prepare (held-out items out of the catalog and every history), embed ... train
    <run>-<mode>         eval with the trained catalog only (new items absent); SASRec-CE (baseline)
    <run>-<mode>-new     the held-out items join the catalog the way serving adds them (their TIDs written by
                         serving's term writer from their text and their nearest catalog items, made distinct
                         from every live TID: ``grlm_ray/serving/catalog.py``), then eval with
                         ``eval.added_items=true`` (their TIDs in the token trie and the grounding index)

Every model is scored on the same test users, the targets split into *new* (a held-out item) and *seen*:
GRLM with the new items, the same model without them, SASRec-CE (it has no trained embedding for an item it
never saw: its new-item rows are measured, not assumed), popularity (training interactions: never a new item)
and the content baseline a user would try first: the user's last item's nearest items by text embedding (the
run's embedding model; every item, seen and new; the item itself excluded). ``new_share_at_10`` is the share
of new items among every top-10 slot (against ``new_target_share``, the share of users whose next item is new).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from grlm_ray.core.config import GrlmConfig
from grlm_ray.core.errors import ConfigError, GrlmError
from grlm_ray.bench.quality import _variant
from grlm_ray.core.run import Run
from grlm_ray.core.storage import copy_stages

log = logging.getLogger(__name__)

COLUMNS = ("model", "recall_at_10_new", "ndcg_at_10_new", "recall_at_10_seen", "ndcg_at_10_seen",
           "recall_at_10", "ndcg_at_10", "new_share_at_10", "users_new", "users_seen")


def plan(cfg: GrlmConfig) -> dict[str, GrlmConfig]:
    """Every run of the benchmark, by role, with its config."""
    if cfg.data.holdout.share <= 0:
        raise ConfigError("grlm bench cold-start needs items held out of training: set data.holdout.share "
                          "(e.g. data.holdout.share=0.05; configs/bench/beauty_cold_start.yaml)")
    b, run = cfg.bench, cfg.run.name
    limit = {"limit_users": b.sample_users if b.mode == "sample" else None}
    out = {"train": cfg,
           "absent": _variant(cfg, f"{run}-{b.mode}", eval={**limit, "added_items": False}, baseline={"loss": "ce"}),
           "new": _variant(cfg, f"{run}-{b.mode}-new", eval={**limit, "added_items": True})}
    if "known_terms" in b.new_item_levers:
        out["new_known"] = _variant(cfg, f"{run}-{b.mode}-new-known", eval={**limit, "added_items": True},
                                    serve={"new_item_terms": "known"})
    if "added_search" in b.new_item_levers:  # eval.added_bonus set once chosen on validation (tune_added_bonus)
        out["new_search"] = _variant(cfg, f"{run}-{b.mode}-new-search", eval={
            **limit, "added_items": True, "added_beams": b.new_item_beams})
    if "added_neighbours" in b.new_item_levers:  # the same model and new items on validation users (tuning)
        out["new_valid"] = _variant(cfg, f"{run}-{b.mode}-new-valid", eval={
            "split": "valid", "limit_users": b.sample_users, "added_items": True})
    return out


LEVER_ROWS = {"new_known": "GRLM + new items, known terms", "new_search": "GRLM + new items, added-item search"}
ANCHORS = {"last": "GRLM + new items, text neighbours of the last item",
           "predicted": "GRLM + new items, text neighbours of its top item"}
MIN_COSINES = (0.95, 0.925, 0.9, 0.875, 0.85, 0.825, 0.8, 0.775, 0.75, 0.7, 0.65, 0.6, 0.5)
SLOTS = (1, 2, 3)  # bench.neighbour_slots' default
# eval.added_within: 0 (the cosine floor alone), or an added item placed only when among the anchor's N nearest
# items of the whole catalog (the content baseline's rule at N=10)
WITHINS = (0, 10, 20)
POSITIONS = ("top", "bottom")
# bench.neighbour_choice=simulated: pools of seen items drawn like the held-out ones, each playing the arrivals
ARRIVAL_POOLS = 5
# bench.neighbour_choice -> the curve point's new-item recall estimate it chooses by
ESTIMATES = {"simulated": "simulated_new_recall", "arrivals": "arrival_new_recall"}
BONUSES = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0)


def validation_beams(cfg: GrlmConfig, users: int, threads: int) -> dict[str, Any]:
    """One decoding pass over ``users`` validation users (seeded) of ``cfg``'s run with the new items added: the
    main beams and the added-item search's (``bench.new_item_beams`` over only the new TIDs), each with its
    log-probabilities, kept beside the run (``bench-cold/added_search_<key>.json``, keyed by everything they
    depend on: a rerun with nothing changed for them reads them back). Returns the users, their targets, both
    beam lists, the ``TidIndex`` they ground with, the decode seconds and whether they were reused."""
    from tqdm import tqdm

    from grlm_ray.core.schemas import ITEMS, SEQUENCES, TARGETS, TERMS
    from grlm_ray.lib.decoding import TidDecoder
    from grlm_ray.lib.eig import TidIndex, tid_text
    from grlm_ray.lib.models import load_tokenizer
    from grlm_ray.lib.protocol import query_table, training_popularity
    from grlm_ray.serving.catalog import UPDATES

    run, e = Run.of(cfg), cfg.eval
    vcfg = _variant(cfg, run.name, eval={"split": "valid", "limit_users": users})
    model_dir = run.local_dir("train", "model", os.path.expanduser("~/.cache/grlm-ray/cold-start"))
    tok = load_tokenizer(model_dir)
    terms = run.read_table("sft", "terms.parquet", TERMS)
    seqs = run.read_table("prepare", "sequences.parquet", SEQUENCES)
    targets = run.read_table("prepare", "targets.parquet", TARGETS)
    items = run.read_table("prepare", "items.parquet", ITEMS, columns=["item_id", "title"])
    queries = query_table(vcfg, items, seqs, targets, terms, tok, history=False)
    added = run.store.read_table(run.file(UPDATES))
    ids = terms.column("item_id").to_pylist() + added.column("item_id").to_pylist()
    tids = terms.column("terms").to_pylist() + added.column("terms").to_pylist()
    added_tids = [tid_text(t) for t in added.column("terms").to_pylist()]
    index = TidIndex(ids, tids, decay=e.decay, match=e.match, fallback_order=training_popularity(seqs, targets))
    prompts, want = queries.column("prompt").to_pylist(), queries.column("target_item_id").to_pylist()
    # the two searches' beams are kept beside the run, keyed by everything they depend on: a rerun of the bench
    # with nothing changed for them (another neighbour grid, another cost) does not decode every user again
    cache = run.file(f"bench-cold/added_search_{added_search_key(run, prompts, added_tids, cfg)}.json")
    reused = run.store.exists(cache)
    if reused:
        got = run.store.read_json(cache)
        main, extra, seconds = got["main"], got["extra"], got["seconds"]
        log.info("cold start: added-item search beams of %d validation users reused (%s)", len(prompts),
                 run.store.uri(cache))
    else:
        decoder = TidDecoder(model_dir, [tid_text(t) for t in tids], num_beams=e.num_beams,
                             max_new_tokens=e.max_new_tokens, threads=threads, dtype=e.dtype,
                             renormalize=bool(e.renormalize))
        extra_decoder = decoder.restricted(added_tids, cfg.bench.new_item_beams)
        main, extra, t0 = [], [], time.time()
        for s in tqdm(range(0, len(prompts), e.batch_size), desc="validation users (added-item search)",
                      disable=not cfg.ray.progress_bars):
            batch = prompts[s:s + e.batch_size]
            main += decoder(batch, batch_size=len(batch), with_scores=True)
            extra += extra_decoder(batch, batch_size=len(batch), with_scores=True)
        seconds = time.time() - t0
        run.store.write_json(cache, {"main": main, "extra": extra, "seconds": seconds})
    return {"users": queries.column("user_id").to_pylist(), "want": want, "main": main, "extra": extra,
            "index": index, "seconds": seconds, "reused": reused}


def tune_added_bonus(cfg: GrlmConfig, held: set[str], users: int, threads: int) -> dict[str, Any]:
    """``eval.added_bonus`` chosen on validation users (``users`` of them, seeded; every validation target is a
    seen item: the new items were held out of every history): one decoding pass writes the main beams and the
    added-item search's beams with their log-probabilities (``validation_beams``); each bonus in ``BONUSES``
    merges them (``merge_beams``), grounds and scores. Chosen: the largest bonus whose validation Recall@10 is at
    least ``1 - bench.new_item_cost`` of the search off (the most new items shown for a bounded cost on seen ones)."""
    from grlm_ray.lib.eig import merge_beams

    b = validation_beams(cfg, users, threads)
    main, extra, want, index = b["main"], b["extra"], b["want"], b["index"]
    k = 10
    curve = []
    for bonus in (-float("inf"), *BONUSES):
        ranked = [index.rank(merge_beams(m, x, bonus), k).items for m, x in zip(main, extra)]
        curve.append({"bonus": bonus, **split_metrics(list(zip(want, ranked)), held, k)})
    floor = (1 - cfg.bench.new_item_cost) * curve[0]["recall_at_10"]
    ok = [p for p in curve[1:] if p["recall_at_10"] >= floor]
    chosen = max(ok, key=lambda p: p["bonus"]) if ok else None
    log.info("cold start: added-item search bonus on %d validation users: %s (R@10 %.4f off, floor %.4f)", len(want),
             "none within the cost" if chosen is None else f"{chosen['bonus']} (R@10 {chosen['recall_at_10']:.4f}, "
             f"new share {chosen['new_share_at_10']:.4f})", curve[0]["recall_at_10"], floor)
    return {"users": len(want), "split": "valid", "beams": cfg.bench.new_item_beams, "cost": cfg.bench.new_item_cost,
            "curve": [{**p, "bonus": None if p["bonus"] == -float("inf") else p["bonus"]} for p in curve],
            "chosen_bonus": chosen["bonus"] if chosen else None, "decode_seconds": round(b["seconds"], 1),
            "beams_reused": b["reused"]}


def added_search_key(run: Run, prompts: list[str], added_tids: list[str], cfg: GrlmConfig) -> str:
    """What ``tune_added_bonus``'s beams depend on, hashed: the trained model (its train manifest's key and
    finish), the validation prompts, the added items' TIDs and the decoding settings."""
    from grlm_ray.core.storage import read_manifest

    m = read_manifest(run.store, run.name, "train") or {}
    e = cfg.eval
    parts = [m.get("config_hash"), m.get("generation"), m.get("finished_at"), prompts, added_tids, e.num_beams,
             e.max_new_tokens, e.dtype, bool(e.renormalize), cfg.bench.new_item_beams]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def held_out_rows(run: Run) -> tuple[list[dict[str, Any]], list[str]]:
    """The held-out items as serving's update rows, and the ids of those without any text (no TID can be
    written for them: counted and reported, their targets stay new and unreachable)."""
    from grlm_ray.core.schemas import ITEMS
    from grlm_ray.serving.catalog import ITEM_FIELDS

    held = run.read_table("prepare", "holdout_items.parquet", ITEMS).to_pylist()
    rows, no_text = [], []
    for r in held:
        row = {k: (r.get(k) or ([] if k == "categories" else "")) for k in ITEM_FIELDS}
        if not (row["title"].strip() or row["description"].strip()):
            no_text.append(row["item_id"])
            continue
        rows.append(row)
    return rows, no_text


def add_new_items(cfg: GrlmConfig, threads: int) -> dict[str, Any]:
    """Write the held-out items' TIDs as serving does and save them as the run's catalog update (skipped
    when the saved update already holds exactly these items)."""
    from grlm_ray.serving.catalog import (UPDATES, CatalogTermWriter, distinct_from_catalog, read_catalog,
                                          save_updates, validate_new_items)

    run = Run.of(cfg)
    rows, no_text = held_out_rows(run)
    want = sorted(r["item_id"] for r in rows)
    updates, store = run.file(UPDATES), run.store
    if store.exists(updates):
        saved = store.read_table(updates)
        if sorted(saved.column("item_id").to_pylist()) == want:
            log.info("cold start: the %d new items' TIDs are already written (%s)", len(want), store.uri(updates))
            return {"written": 0, "items": len(want), "without_text": no_text, "seconds": 0.0}
        store.fs.delete_file(store.path(updates))  # another held-out set: written again
    t0 = time.time()
    catalog = read_catalog(run)
    clean = validate_new_items(rows, catalog, need_terms=False)
    written = distinct_from_catalog(catalog, CatalogTermWriter(cfg, threads)(catalog, clean))
    save_updates(run, catalog.with_items(written))
    return {"written": len(written), "items": len(written), "without_text": no_text,
            "seconds": round(time.time() - t0, 2), "sources": _count([r["source"] for r in written])}


def _count(values: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def reachability(seen_tids: list[list[str]], new_tids: list[list[str]]) -> dict[str, Any]:
    """Can the model write a new item's TID at all? The share of new items whose first term some seen item's
    TID starts with, whose first two terms some seen TID starts with, and whose every term the model has
    written somewhere (any position of any seen TID)."""
    firsts = {t[0] for t in seen_tids if t}
    pairs = {tuple(t[:2]) for t in seen_tids if len(t) >= 2}
    vocab = {w for t in seen_tids for w in t}
    n = max(1, len(new_tids))
    return {"new_items": len(new_tids),
            "first_term_written_first": round(sum(1 for t in new_tids if t and t[0] in firsts) / n, 4),
            "first_two_terms_written_first": round(sum(1 for t in new_tids if tuple(t[:2]) in pairs) / n, 4),
            "every_term_known": round(sum(1 for t in new_tids if all(w in vocab for w in t)) / n, 4),
            "tid_equal_to_a_seen_tid": round(len({tuple(t) for t in new_tids} & {tuple(t) for t in seen_tids}) / n, 4)}


def split_metrics(rows: list[tuple[str, list[str]]], new: set[str], k: int = 10) -> dict[str, Any]:
    """Recall / NDCG@k over new-item targets, seen-item targets and all, and the share of new items among
    every top-k slot; ``rows`` are (target item, ranked items) per user."""
    from grlm_ray.lib.metrics import ndcg_at_k, recall_at_k

    out: dict[str, Any] = {}
    for name, pick in (("new", lambda t: t in new), ("seen", lambda t: t not in new), ("", lambda t: True)):
        part = [(t, r) for t, r in rows if pick(t)]
        sfx = f"_{name}" if name else ""
        n = len(part)
        out[f"recall_at_{k}{sfx}"] = round(sum(recall_at_k(r, t, k) for t, r in part) / n, 6) if n else None
        out[f"ndcg_at_{k}{sfx}"] = round(sum(ndcg_at_k(r, t, k) for t, r in part) / n, 6) if n else None
        if name:
            out[f"users_{name}"] = n
    slots = sum(len(r[:k]) for _, r in rows)
    out[f"new_share_at_{k}"] = round(sum(1 for _, r in rows for i in r[:k] if i in new) / slots, 6) if slots else None
    return out


def last_items(cfg: GrlmConfig, users: list[str]) -> list[str]:
    """Each scored user's last history item (``cfg.eval``'s split and sample; ``users`` must be exactly
    those users in that order)."""
    from grlm_ray.core.schemas import SEQUENCES, TARGETS
    from grlm_ray.lib.protocol import last_history_items, target_rows

    run = Run.of(cfg)
    t = target_rows(run.read_table("prepare", "targets.parquet", TARGETS), cfg.eval.split,
                    cfg.eval.limit_users, cfg.eval.seed)
    if t.column("user_id").to_pylist() != users:
        raise GrlmError(f"cold start: {run.name}'s {cfg.eval.split} users differ from the scored ones")
    return last_history_items(run.read_table("prepare", "sequences.parquet", SEQUENCES), t)


def content_rankings(ids: list[str], base: np.ndarray, last: list[str], k: int) -> list[list[str]]:
    """The content baseline: for each user, the ``k`` items (seen and new) nearest to their last history item
    by text embedding (cosine; the item itself excluded)."""
    at = {i: n for n, i in enumerate(ids)}
    rows = np.array([at[i] for i in last])
    out: list[list[str]] = []
    for s in range(0, len(rows), 2048):
        sc = base[rows[s:s + 2048]] @ base.T
        sc[np.arange(len(sc)), rows[s:s + 2048]] = -np.inf
        top = np.argsort(-sc, axis=1, kind="stable")[:, :k]
        out += [[ids[j] for j in row] for row in top]
    return out


def neighbour_curve(rows: list[tuple[str, list[str]]], cands: list[list[tuple[str, float]]], held: set[str],
                    k: int = 10, fill: int = 0, content: list[list[str]] | None = None,
                    floors: dict[int, list[float]] | None = None,
                    slot_counts: tuple[int, ...] | list[int] = SLOTS) -> list[dict[str, Any]]:
    """``split_metrics`` of the ranked lists with the new items placed by ``place_added``, for every
    (rank gate, position, slots, similarity floor) in ``floors`` x ``POSITIONS`` x ``slot_counts`` x ``MIN_COSINES``;
    the first point is the lever off. ``floors``: within -> each user's floor (``TextNeighbours.floors`` over the
    whole catalog; ``eval.added_within``); none: the cosine floor alone (within 0). ``fill``: each list then gets
    its last ``fill`` places of ``k`` from ``content`` (each user's text neighbours, ``fill_content``), as the
    eval stage does after placing (``eval.content_fill``); a 'bottom' placement then takes the last places above
    the fill (``placement_depth``)."""
    from grlm_ray.lib.eig import fill_content, gate, place_added, placement_depth

    def refill(lists: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
        return [(t, fill_content(r, c, fill, k)) for (t, r), c in zip(lists, content)] if fill else lists

    curve = [{"position": None, "slots": 0, "min_cosine": None, "within": 0, **split_metrics(refill(rows), held, k)}]
    for within in (0, *sorted(w for w in floors or {} if w)):
        gated = gate(cands, floors[within]) if within else cands
        for position in POSITIONS:
            for slots in slot_counts:
                for m in MIN_COSINES:
                    placed = refill([(t, place_added(r, c, m, slots, position, placement_depth(k, fill)))
                                     for (t, r), c in zip(rows, gated)])
                    curve.append({"position": position, "slots": slots, "min_cosine": m, "within": within,
                                  **split_metrics(placed, held, k)})
    return curve


def choose_neighbours(curve: list[dict[str, Any]], cost: float, by: str = "share",
                      base: float | None = None) -> dict[str, Any] | None:
    """Among the validation points whose Recall@10 is at least ``1 - cost`` of the lever off (validation targets
    are seen items only: new items were held out of every history), the one showing the most new items
    (``by`` share), or the one whose placement rule found the most simulated arrivals (``by`` simulated: the
    point's ``simulated_new_recall``, ``simulate_arrivals``), or the most real ones on validation (``by``
    arrivals: ``arrival_new_recall``, ``arrival_recalls``; ties, both: the larger new share — with the content fill,
    a new item placed among the fill's neighbours takes a place the fill would have shown anyway, which the
    model-free simulation cannot see — then the better seen Recall@10, then NDCG@10). ``base``: the Recall@10 the
    cost is measured against, when not the lever-off point's (with the content fill: the same filled lists without
    the new items, ``tune_neighbours``)."""
    floor = (1 - cost) * (curve[0]["recall_at_10"] if base is None else base)
    # a rule that shows no more new items than the lever off changes nothing a user sees (e.g. every new item it
    # places is one the content fill shows anyway): it costs nothing and, by the model-free simulation, can look
    # best — it is no lever
    ok = [p for p in curve[1:] if p["recall_at_10"] >= floor and p["new_share_at_10"] > curve[0]["new_share_at_10"]]
    if not ok:
        return None
    if by in ESTIMATES:
        return max(ok, key=lambda p: (p[ESTIMATES[by]], p["new_share_at_10"], p["recall_at_10"], p["ndcg_at_10"]))
    return max(ok, key=lambda p: (p["new_share_at_10"], p["recall_at_10"]))


def arrival_pools(run: Run, seqs: Any, size: int, candidates: float, seed: int, pools: int) -> list[list[str]]:
    """``pools`` seeded draws (seeds after ``seed``) of ``size`` items of the trained catalog by the holdout's own
    rule (among its latest-arriving ``candidates`` share of ``seqs``, the run's training sequences): stand-ins for
    arrivals that, unlike the held-out items, are validation targets."""
    from grlm_ray.core.schemas import ITEMS
    from grlm_ray.stages.prepare.core import arrival_scores

    items = run.read_table("prepare", "items.parquet", ITEMS, columns=["item_id"]).column("item_id").to_pylist()
    scores, _ = arrival_scores(seqs)
    late = sorted(items, key=lambda i: (-scores.get(i, float("inf")), i))[:int(round(candidates * len(items)))]
    if size > len(late):
        raise GrlmError(f"cold start: {size} simulated arrivals asked for but only {len(late)} late items")
    return [sorted(late[j] for j in np.random.default_rng(seed + 1 + p).choice(len(late), size, replace=False))
            for p in range(pools)]


def simulate_arrivals(anchors: list[str | None], targets: list[str], pools: list[list[str]], ids: list[str],
                      emb: np.ndarray, floors: dict[int, list[float]],
                      slot_counts: tuple[int, ...] | list[int] = SLOTS, histories: list[list[str]] | None = None,
                      near: Any = None) -> dict[tuple[int, int, float], dict[str, Any]]:
    """How often each placement rule (within, slots, cosine floor: ``neighbour_curve``'s grid) would have shown
    the arrival a user went on to buy, measured where that can be seen: each pool of ``pools`` (seen items
    drawn like the held-out ones, ``arrival_pools``) plays the new items — the rule places its members nearest
    the user's ``anchors`` item — and the users whose target is in the pool are the new-item targets. The rule
    needs no model, only text neighbours, so its recall on these arrivals is a validation estimate of its
    recall on the real ones (which no validation user has). ``floors``: the rank gate's, over the whole catalog
    (``TextNeighbours.floors_at``). ``histories`` (each user's items before the target) with ``near`` (the whole
    catalog's ``TextNeighbours``): each pool's members are taken out of the histories first, as the holdout
    takes the real arrivals out of every history — the anchor is the last history item *not* in the pool (a
    user who bought one arrival right after another would otherwise be anchored on its near-twin, which no real
    arrival's buyer is), and the floors are its own. Returns (within, slots, floor) -> recall and users, pooled
    over the pools."""
    from grlm_ray.lib.eig import TextNeighbours

    if histories is not None and near is None:
        raise GrlmError("simulate_arrivals: histories need the whole catalog's neighbours (near) for the floors")
    withins = sorted(w for w in floors if w) if histories is None else [w for w in WITHINS if w]
    hits: dict[tuple[int, int, float], int] = {}
    users = 0
    for pool in pools:
        members = set(pool)
        rows = [j for j, t in enumerate(targets) if t in members]
        users += len(rows)
        if histories is None:
            at = [anchors[j] for j in rows]
            fl = {w: [floors[w][j] for j in rows] for w in withins}
        else:
            at = [next((x for x in reversed(histories[j]) if x not in members), None) for j in rows]
            fl = near.floors_at(at, withins)
        cands = TextNeighbours(ids, emb, pool).candidates(at, max(slot_counts))
        for key, n in rule_hits([targets[j] for j in rows], cands, fl, withins, slot_counts).items():
            hits[key] = hits.get(key, 0) + n
    return {key: {"recall": round(n / users, 6) if users else 0.0, "users": users} for key, n in hits.items()}


def rule_hits(want: list[str], cands: list[list[tuple[str, float]]], floors: dict[int, list[float]],
              withins: list[int], slot_counts: tuple[int, ...] | list[int], fill: int = 0,
              content: list[list[str]] | None = None, k: int = 10) -> dict[tuple[int, int, float], int]:
    """For each placement rule (within: 0 and ``withins``, ``slot_counts``, ``MIN_COSINES``), how many users' target
    ``want`` the rule shows, model-free: of ``k`` places the model fills (never with a new item here), the rule's
    new items (of ``cands``, gated by ``floors``) take the last ones — above the last ``fill``, which then go to
    each user's ``content`` ranking, as the eval stage refills."""
    from grlm_ray.lib.eig import fill_content, gate, place_added, placement_depth

    model = [f"\x00{j}" for j in range(k)]  # the model's places: never a new item
    depth = placement_depth(k, fill)
    hits: dict[tuple[int, int, float], int] = {}
    for within in (0, *withins):
        gated = gate(cands, floors[within]) if within else cands
        for slots in slot_counts:
            for m in MIN_COSINES:
                n = 0
                for j, (w, c) in enumerate(zip(want, gated)):
                    shown = place_added(model, c, m, slots, "bottom", depth)
                    n += w in (fill_content(shown, content[j], fill, k) if fill else shown)
                hits[(within, slots, m)] = n
    return hits


def validation_arrivals(cfg: GrlmConfig, seqs: Any) -> tuple[list[str | None], list[str]]:
    """The validation split's **real** new-item targets: the users whose validation target was a held-out item
    (the holdout took it out of their history and kept the row apart: ``prepare/holdout_targets.parquet``;
    nothing trains on it) — (each one's anchor: the last item of its history, seen items only as a test
    history; its target). ``seqs``: the run's prepared sequences."""
    from grlm_ray.core.schemas import TARGETS
    from grlm_ray.lib.protocol import history_items

    run = Run.of(cfg)
    if not run.exists("prepare", "holdout_targets.parquet"):
        where = run.uri("prepare", "holdout_targets.parquet")
        raise GrlmError(f"cold start: bench.neighbour_choice=arrivals needs {where}"
                        " (prepare writes it under data.holdout since 2026-12-07): redo prepare (grlm prep CONFIG "
                        "--redo; the stages after it run again) or choose by bench.neighbour_choice=simulated")
    t = run.read_table("prepare", "holdout_targets.parquet", TARGETS)
    if t.num_rows == 0:
        raise GrlmError("cold start: no validation target is a held-out item (prepare/holdout_targets.parquet is "
                        "empty): bench.neighbour_choice=arrivals has nothing to choose on; use simulated or share")
    return [h[-1] if h else None for h in history_items(seqs, t)], t.column("target_item_id").to_pylist()


def arrival_recalls(anchors: list[str | None], want: list[str], placer: Any, near: Any,
                    slot_counts: tuple[int, ...] | list[int] = SLOTS, fill: int = 0, k: int = 10) -> dict[str, Any]:
    """Each placement rule's recall (``neighbour_curve``'s grid: within, slots, cosine floor) on real arrivals
    (``validation_arrivals``: each user's ``anchors`` item, the new item ``want`` it went on to buy): the rule
    places the new items nearest the anchor (``placer``: the new items' ``TextNeighbours``; ``near``: the whole
    catalog's, for the rank gate and the content fill). A placement's new-item recall needs no model: of ``k``
    places the model fills (never with a new item here), the rule's take the last ones (``fill``: above the last
    ``fill``, then given to ``near``'s neighbours of the anchor, as the eval stage refills), and a target counts
    where one of them is it. Also the content baseline's recall on the same rows (the anchor's ``k`` nearest items
    of the whole catalog). Returns ``{"last": (within, slots, floor) -> recall and users, "users",
    "content_recall", "fill"}``."""
    withins = [w for w in WITHINS if w]
    content = near.ranked(anchors, k)
    hits = rule_hits(want, placer.candidates(anchors, max(slot_counts)), near.floors_at(anchors, withins), withins,
                     slot_counts, fill, content, k)
    out = {key: {"recall": round(n / len(want), 6), "users": len(want)} for key, n in hits.items()}
    content_recall = round(sum(w in c for w, c in zip(want, content)) / len(want), 6)
    best = max(out.items(), key=lambda kv: kv[1]["recall"])
    log.info("cold start: real arrivals on validation (%d users whose validation target is a new item, fill %d): "
             "best rule %s recall %.4f; content baseline %.4f", len(want), fill, best[0], best[1]["recall"],
             content_recall)
    return {"last": out, "users": len(want), "content_recall": content_recall, "fill": fill}


def validation_lists(valid: GrlmConfig) -> tuple[list[str], list[tuple[str, list[str]]], list[str]]:
    """(users, (target, ranked) rows, each user's last history item) of ``valid``'s evaluation."""
    from grlm_ray.core.schemas import PREDICTIONS

    p = Run.of(valid).read_table("eval", "predictions.parquet", PREDICTIONS)
    users = p.column("user_id").to_pylist()
    rows = list(zip(p.column("target_item_id").to_pylist(), p.column("ranked_item_ids").to_pylist()))
    return users, rows, last_items(valid, users)


def tune_content_fill(cfg: GrlmConfig, valid: GrlmConfig, held: set[str], near: Any, k: int = 10) -> dict[str, Any]:
    """``eval.content_fill`` on ``valid``'s users (the new items in the catalog, so in the neighbours ``near``
    ranks): ``fill_points`` of its lists (every validation target is a seen item)."""
    _, rows, last = validation_lists(valid)
    return fill_points(rows, near.ranked(last, k), cfg.bench.content_fills, held, k)


def fill_points(rows: list[tuple[str, list[str]]], content: list[list[str]], fills: list[int], held: set[str],
                k: int = 10) -> dict[str, Any]:
    """``split_metrics`` of (target, ranked) ``rows`` refilled (``fill_content``) from each user's ``content`` for
    0 and each of ``fills``; chosen: the best Recall@k then NDCG@k (ties: the smaller fill)."""
    from grlm_ray.lib.eig import fill_content

    for f in fills:
        if f > k:
            raise GrlmError(f"bench.content_fills: {f} is more than the {k} places it fills (eval.content_depth)")
    points = [{"content_fill": f, **split_metrics([(t, fill_content(r, c, f, k)) for (t, r), c in zip(rows, content)],
                                                  held, k)} for f in sorted({0, *fills})]
    best = max(points, key=lambda q: (q[f"recall_at_{k}"], q[f"ndcg_at_{k}"], -q["content_fill"]))
    return {"chosen": best["content_fill"], "users": len(rows), "points": points}


def simulated_recalls(cfg: GrlmConfig, valid: GrlmConfig, held: set[str], near: Any, ids: list[str],
                      emb: np.ndarray, seqs: Any, targets: Any) -> dict[str, Any]:
    """``simulate_arrivals`` for each anchor (``ANCHORS``) on ``ARRIVAL_POOLS`` pools as large as the held-out
    set: the last item's over every validation user (no model needed), the model's top item's over ``valid``'s
    scored users. ``seqs`` / ``targets``: the run's prepared sequences and targets."""
    from grlm_ray.lib.protocol import history_items, target_rows

    run, h = Run.of(cfg), cfg.data.holdout
    pools = arrival_pools(run, seqs, len(held), h.candidates, h.seed, ARRIVAL_POOLS)
    t = target_rows(targets, "valid", None, cfg.eval.seed)
    hists = history_items(seqs, t)
    _, rows, _ = validation_lists(valid)
    withins = [w for w in WITHINS if w]
    out: dict[str, Any] = {"pools": ARRIVAL_POOLS, "pool_items": len(held),
                           "histories": "each pool's members taken out (the last item: the last one not in the pool)"}
    for anchor in ANCHORS:
        if anchor == "last":  # model-free: the pool's members taken out of the histories, as the holdout does
            out[anchor] = simulate_arrivals([], t.column("target_item_id").to_pylist(), pools, ids, emb, {},
                                            cfg.bench.neighbour_slots, histories=hists, near=near)
        else:  # the model's top item: its lists were decoded from the histories as they are
            anchors = [r[0] if r else None for _, r in rows]
            out[anchor] = simulate_arrivals(anchors, [w for w, _ in rows], pools, ids, emb,
                                            near.floors_at(anchors, withins), cfg.bench.neighbour_slots)
        best = max(out[anchor].items(), key=lambda kv: kv[1]["recall"])
        log.info("cold start: simulated arrivals (%s item, %d target users over %d pools): best rule %s recall %.4f",
                 anchor, best[1]["users"], ARRIVAL_POOLS, best[0], best[1]["recall"])
    return out


def tune_neighbours(cfg: GrlmConfig, valid: GrlmConfig, held: set[str], placer: Any, near: Any, fill: int = 0,
                    simulated: dict[str, Any] | None = None, near_seen: Any = None,
                    anchors: tuple[str, ...] = tuple(ANCHORS),
                    arrivals: dict[str, Any] | None = None) -> dict[str, Any]:
    """For each anchor (``ANCHORS``), the rank gate, similarity floor and slots of ``added_neighbours`` chosen on
    ``valid``'s users (``choose_neighbours``, cost ``bench.new_item_cost``, by ``bench.neighbour_choice``), with
    the whole curve; ``near``: the whole catalog's text neighbours (the rank gate's floors); ``fill``: on lists
    then refilled with ``fill`` of them, the cost measured against the refilled lists; ``simulated``:
    ``simulated_recalls`` (each point gets its rule's ``simulated_new_recall``; needed by the simulated
    choice); ``arrivals``: ``arrival_recalls`` with the same ``fill`` (each point gets ``arrival_new_recall``;
    needed by the arrivals choice, which tunes only the anchors it has: the last item). Every choice the estimates
    allow is recorded (``chosen``, and ``chosen_by_<share|simulated|arrivals>``).
    ``near_seen`` (with ``fill``): the text neighbours among the seen items only; the cost is then measured against
    the same lists filled from them with the new items taken out (``reference``: the same filled model without the
    new items, what the bench's row compares with on test) — not against the lever-off point, whose fill already
    shows new items and so already costs seen hits. ``anchors``: the ones tuned (default every one)."""
    users, rows, last = validation_lists(valid)
    by = cfg.bench.neighbour_choice
    estimates = {"simulated": simulated, "arrivals": arrivals}
    if by in estimates and estimates[by] is None:
        raise GrlmError(f"cold start: bench.neighbour_choice={by} needs its new-item recalls ({by} arrivals)")
    if by == "arrivals":
        anchors = tuple(a for a in anchors if a in arrivals)
    out: dict[str, Any] = {"users": len(users), "split": valid.eval.split, "cost": cfg.bench.new_item_cost,
                           "content_fill": fill, "choice": by}
    content = near.ranked(last, 10) if fill else None
    base = None
    if fill and near_seen is not None:
        from grlm_ray.lib.eig import fill_content

        ref = split_metrics([(t, fill_content([x for x in r if x not in held], c, fill, 10))
                             for (t, r), c in zip(rows, near_seen.ranked(last, 10))], held, 10)
        out["reference"] = {"lists": "the same lists without the new items, filled from the seen items only", **ref}
        base = ref["recall_at_10"]
    for anchor in anchors:
        items = anchor_items(last, rows, anchor)
        cands = placer.candidates(items, max(cfg.bench.neighbour_slots))
        floors = near.floors_at(items, [w for w in WITHINS if w])
        curve = neighbour_curve(rows, cands, held, fill=fill, content=content, floors=floors,
                                slot_counts=cfg.bench.neighbour_slots)
        for name, est in estimates.items():
            if est is not None and anchor in est:
                for p in curve:
                    rule = est[anchor].get((p["within"], p["slots"], p["min_cosine"]))
                    p[ESTIMATES[name]] = rule["recall"] if rule else 0.0
        chosen = choose_neighbours(curve, cfg.bench.new_item_cost, by, base)
        alts = {f"chosen_by_{o}": _rule(choose_neighbours(curve, cfg.bench.new_item_cost, o, base))
                for o in ("share", *ESTIMATES) if o != by and (o == "share" or ESTIMATES[o] in curve[0])}
        log.info("cold start: neighbours of the %s item on %d validation users: %s", anchor, len(users),
                 "none within the cost" if chosen is None else f"{chosen['slots']} slots ({chosen['position']}), cosine >= "
                 f"{chosen['min_cosine']}, within {chosen['within'] or 'any'} (R@10 {chosen['recall_at_10']:.4f} vs "
                 f"{curve[0]['recall_at_10'] if base is None else base:.4f} {'off' if base is None else 'without new items'}, "
                 f"new share {chosen['new_share_at_10']:.4f})")
        out[anchor] = {"chosen": _rule(chosen), **alts, "curve": curve}
    return out


def _rule(point: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if point is None else {k: point[k] for k in ("position", "slots", "min_cosine", "within")}


def anchor_items(last: list[str], rows: list[tuple[str, list[str]]], anchor: str) -> list[str]:
    """The item each user's new-item neighbours are measured from: their last history item, or the model's
    top-ranked item."""
    return last if anchor == "last" else [r[0] for _, r in rows]


def cold_start(cfg: GrlmConfig, threads: int = 2) -> dict[str, Any]:
    from grlm_ray.core.schemas import SEQUENCES, TARGETS, TERMS
    from grlm_ray.flows.pipeline import run_pipeline, upstream
    from grlm_ray.lib.protocol import training_popularity
    from grlm_ray.serving.catalog import UPDATES

    t0 = time.time()
    runs = plan(cfg)
    run_ = Run.of(cfg)
    store = run_.store
    base = run_pipeline(cfg, stages=upstream("train", cfg))["stages"]
    holdout = base["prepare"]["info"]["holdout"]
    train = base["train"]

    absent = runs["absent"]
    copy_stages(store, cfg.run.name, absent.run.name, upstream("train", absent))
    ev_absent = run_pipeline(absent, stages=upstream("eval", absent))["stages"]["eval"]
    bl = run_pipeline(absent, stages=("prepare", "baseline"))["stages"]["baseline"] \
        if "sasrec_ce" in cfg.bench.baselines else None

    new_cfg = runs["new"]
    held = set(run_.read_table("prepare", "holdout_items.parquet").column("item_id").to_pylist())
    evals, adds, tuning = {}, {}, None
    for role in ("new", *LEVER_ROWS, "new_valid"):
        if role in runs:
            c_ = runs[role]
            copy_stages(store, cfg.run.name, c_.run.name, upstream("train", c_))
            adds[role] = add_new_items(c_, threads)
            if role == "new_search":
                tuning = tune_added_bonus(c_, held, cfg.bench.sample_users, threads)
                if tuning["chosen_bonus"] is None:
                    log.warning("cold start: no added-item bonus keeps validation Recall@10 within %.0f%%: "
                                "the search row is left out", 100 * cfg.bench.new_item_cost)
                    continue
                c_ = runs[role] = _variant(c_, c_.run.name, eval={"added_bonus": tuning["chosen_bonus"]})
            evals[role] = run_pipeline(c_, stages=upstream("eval", c_))["stages"]["eval"]
    added, ev_new = adds["new"], evals["new"]

    def predictions(run: str, stage: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
        from grlm_ray.core.schemas import PREDICTIONS

        p = run_.named(run).read_table(stage, "predictions.parquet", PREDICTIONS)
        return p.column("user_id").to_pylist(), list(zip(p.column("target_item_id").to_pylist(),
                                                         p.column("ranked_item_ids").to_pylist()))

    users, grlm_new = predictions(new_cfg.run.name, "eval")
    k = 10
    ranked: dict[str, list[tuple[str, list[str]]]] = {"GRLM + new items": grlm_new}
    for name, (run, stage) in {**{LEVER_ROWS[r]: (runs[r].run.name, "eval") for r in LEVER_ROWS if r in evals},
                               "GRLM, new items absent": (absent.run.name, "eval"),
                               **({"SASRec-CE": (absent.run.name, "baseline")} if bl else {})}.items():
        u, r = predictions(run, stage)
        if u != users:
            raise GrlmError(f"cold start: {name} ({run}/{stage}) was scored on other users than GRLM + new items")
        ranked[name] = r
    seqs = run_.read_table("prepare", "sequences.parquet", SEQUENCES)
    targets = run_.read_table("prepare", "targets.parquet", TARGETS)
    popular = training_popularity(seqs, targets)[:k]
    ranked["popularity"] = [(t, popular) for t, _ in grlm_new]
    rows_new, no_text = held_out_rows(Run.of(new_cfg))
    from sentence_transformers import SentenceTransformer

    from grlm_ray.lib.models import resolve_model_path
    from grlm_ray.lib.embeddings import catalog_embeddings

    encoder = SentenceTransformer(resolve_model_path(cfg.embed.model), device="cpu")
    t1 = time.time()
    ids, emb = catalog_embeddings(new_cfg, rows_new, encoder)
    last = last_items(new_cfg, users)
    content = content_rankings(ids, emb, last, k)
    content_s = time.time() - t1
    ranked["content (last item's text neighbours)"] = [(t, r) for (t, _), r in zip(grlm_new, content)]
    neighbours, test_curves, simulated = None, {}, None
    if "new_valid" in runs:  # added_neighbours: chosen on validation users, applied once to the test lists
        from grlm_ray.lib.eig import TextNeighbours, gate, place_added

        placer = TextNeighbours(ids, emb, [r["item_id"] for r in rows_new])
        near_all = TextNeighbours(ids, emb, ids)  # the pool as serving has it: every item, the new ones too
        # the simulation is kept beside the real arrivals' choice (model-free, cheap): how far apart they choose
        simulated = simulated_recalls(cfg, runs["new_valid"], held, near_all, ids, emb, seqs, targets) \
            if cfg.bench.neighbour_choice in ESTIMATES else None
        arriving = validation_arrivals(cfg, seqs) if cfg.bench.neighbour_choice == "arrivals" else None
        arrivals = arrival_recalls(*arriving, placer, near_all, cfg.bench.neighbour_slots) if arriving else None
        neighbours = tune_neighbours(cfg, runs["new_valid"], held, placer, near_all, simulated=simulated,
                                     arrivals=arrivals)
        if arrivals is not None:
            neighbours["real_arrivals"] = {k_: arrivals[k_] for k_ in ("users", "content_recall", "fill")}
        if simulated is not None:
            neighbours["simulated_arrivals"] = {"pools": simulated["pools"], "pool_items": simulated["pool_items"],
                                                "target_users": {a: next(iter(simulated[a].values()))["users"]
                                                                 for a in ANCHORS}}
        test_cands, test_floors = {}, {}
        for anchor, name in ANCHORS.items():
            anchors = anchor_items(last, grlm_new, anchor)
            cands = test_cands[anchor] = placer.candidates(anchors, max(cfg.bench.neighbour_slots))
            floors = test_floors[anchor] = near_all.floors_at(anchors, [w for w in WITHINS if w])
            # the whole test curve is recorded for the plot; only the validation choice is a row
            test_curves[anchor] = neighbour_curve(grlm_new, cands, held, floors=floors,
                                                  slot_counts=cfg.bench.neighbour_slots)
            chosen = (neighbours.get(anchor) or {}).get("chosen")  # the arrivals choice tunes the last item only
            if chosen is not None:
                gated = gate(cands, floors[chosen["within"]]) if chosen["within"] else cands
                ranked[name] = [(t, place_added(r, c, chosen["min_cosine"], chosen["slots"], chosen["position"],
                                                k)) for (t, r), c in zip(grlm_new, gated)]

    fill_tuning = None
    if cfg.bench.content_fills and "new_valid" in runs:  # eval.content_fill, then the placement on top of it
        from grlm_ray.lib.eig import fill_content, placement_depth

        fill_tuning = tune_content_fill(cfg, runs["new_valid"], held, near_all, k)
        f = fill_tuning["chosen"]
        if f:
            new_ids = {r["item_id"] for r in rows_new}
            seen_pool = TextNeighbours(ids, emb, [i for i in ids if i not in new_ids])  # the fill without new items
            ranked[f"GRLM, new items absent + {f} text neighbours"] = [
                (t, fill_content(r, c, f, k)) for (t, r), c in zip(ranked["GRLM, new items absent"],
                                                                    seen_pool.ranked(last, k))]
            content_all = near_all.ranked(last, k)
            ranked[f"GRLM + new items + {f} text neighbours"] = [
                (t, fill_content(r, c, f, k)) for (t, r), c in zip(grlm_new, content_all)]
            arrivals_f = arrival_recalls(*arriving, placer, near_all, cfg.bench.neighbour_slots, f) \
                if arriving else None
            tuned = tune_neighbours(cfg, runs["new_valid"], held, placer, near_all, f, simulated, seen_pool,
                                    anchors=("last",), arrivals=arrivals_f)  # the last item's neighbours only
            fill_tuning["neighbours"] = {**tuned["last"], "reference": tuned["reference"]}
            if arrivals_f is not None:
                fill_tuning["neighbours"]["real_arrivals"] = {k_: arrivals_f[k_] for k_ in ("users", "content_recall",
                                                                                            "fill")}
            chosen = fill_tuning["neighbours"]["chosen"]
            if chosen is not None:
                cands = test_cands["last"]  # the last item's new neighbours, as searched above
                if chosen["within"]:
                    cands = gate(cands, test_floors["last"][chosen["within"]])
                ranked[f"GRLM + new items, text neighbours of the last item + {f} text neighbours"] = [
                    (t, fill_content(place_added(r, c, chosen["min_cosine"], chosen["slots"], chosen["position"],
                                                 placement_depth(k, f)), cc, f, k))
                    for (t, r), c, cc in zip(grlm_new, cands, content_all)]

    train_s, seconds = train["seconds"], {"GRLM + new items": ev_new["seconds"],
                                          **{LEVER_ROWS[r]: evals[r]["seconds"] for r in LEVER_ROWS if r in evals},
                                          "GRLM, new items absent": ev_absent["seconds"],
                                          "content (last item's text neighbours)": round(content_s, 2)}
    rows = []
    for name, r in ranked.items():
        row = {"model": name, **split_metrics(r, held, k)}
        row["train_s"] = train_s if name.startswith("GRLM") else (bl["info"]["train_seconds"] if name == "SASRec-CE" else None)
        row["eval_s"] = seconds.get(name, bl["info"]["eval_seconds"] if name == "SASRec-CE" and bl else None)
        rows.append(row)
    by = {r["model"]: r for r in rows}
    seen_tids = run_.read_table("sft", "terms.parquet", TERMS).column("terms").to_pylist()
    new_tids = store.read_table(run_.named(new_cfg.run.name).file(UPDATES)).column("terms").to_pylist()
    g, a, c = by["GRLM + new items"], by["GRLM, new items absent"], by["content (last item's text neighbours)"]

    def rel(x: float | None, y: float | None) -> float | None:
        return round(x / y, 4) if x is not None and y else None

    n_users = len(users)
    filled = {}  # each text-neighbour row: new items vs the content baseline; seen items vs the model without new
    for name, r in by.items():  # items, plain and with the same fill (the cost the new items themselves add)
        if name.startswith("GRLM + new items") and name.endswith("text neighbours"):
            f = name.rsplit(" + ", 1)[1]
            ref = by.get(f"GRLM, new items absent + {f}")
            filled[name] = {"recall_at_10_new_vs_content": rel(r["recall_at_10_new"], c["recall_at_10_new"]),
                            "seen_recall_at_10_vs_absent": rel(r["recall_at_10_seen"], a["recall_at_10_seen"]),
                            "seen_recall_at_10_vs_absent_with_the_fill": rel(r["recall_at_10_seen"],
                                                                             ref and ref["recall_at_10_seen"])}
    out = {"run": cfg.run.name, "mode": cfg.bench.mode, "rows": rows, "columns": [*COLUMNS, "train_s", "eval_s"],
           "protocol": {**holdout, "split": cfg.eval.split, "users": n_users, "limit": cfg.eval.limit_users,
                        "seed": cfg.eval.seed, "new_target_share": round(g["users_new"] / n_users, 6) if n_users else None,
                        "user_ids_sha1": hashlib.sha1("\n".join(sorted(users)).encode()).hexdigest(),
                        "new_item_tids": "serving's term writer (ctg.method=" + cfg.ctg.method + "), neighbours "
                                         "among the catalog's items, made distinct from every live TID",
                        "content_baseline": "cosine of the run's text embeddings (" + cfg.embed.model + "), the "
                                            "user's last history item, the item itself excluded",
                        "history_masked": False},
           "new_items": {**added, "without_text": len(added["without_text"]),
                         "in_trie_and_index": ev_new["info"].get("added_items"),
                         "without_text_ids": added["without_text"][:20], **reachability(seen_tids, new_tids)},
           "levers": {LEVER_ROWS[r]: {"in_trie_and_index": evals[r]["info"].get("added_items"), **reachability(
               seen_tids, store.read_table(run_.named(runs[r].run.name).file(UPDATES)).column("terms").to_pylist())}
               for r in LEVER_ROWS if r in evals},
           "added_search_tuning": tuning,
           "added_neighbours_tuning": neighbours,
           "added_neighbours_test_curves": test_curves or None,
           "content_fill_tuning": fill_tuning,
           "ratios": {"grlm_vs_content_recall_at_10_new": rel(g["recall_at_10_new"], c["recall_at_10_new"]),
                      "seen_recall_at_10_with_vs_without_new": rel(g["recall_at_10_seen"], a["recall_at_10_seen"]),
                      "seen_ndcg_at_10_with_vs_without_new": rel(g["ndcg_at_10_seen"], a["ndcg_at_10_seen"]),
                      "new_share_at_10_vs_new_target_share": rel(g["new_share_at_10"], g["users_new"] / n_users if n_users else None),
                      "content_fill_rows": filled or None},
           "runs": {role: c_.run.name for role, c_ in runs.items()},
           "model": cfg.model.model_dump(mode="json"), "train_config": cfg.train.model_dump(mode="json"),
           "training": {k_: train["info"].get(k_) for k_ in ("steps", "final_loss", "train_seconds")},
           "validation_curve": (train["info"].get("validation") or {}).get("points"),
           "seconds": round(time.time() - t0, 1)}
    out["mlflow_run_id"] = _log(cfg, out)
    return out


def plot(rows: list[dict[str, Any]], title: str) -> bytes:
    """Recall@10 and NDCG@10 on new-item and on seen-item targets, one group of bars per model."""
    from grlm_ray.bench.quality import plot as bars

    return bars(rows, title, ("recall_at_10_new", "ndcg_at_10_new", "recall_at_10_seen", "ndcg_at_10_seen"))


def plot_frontier(out: dict[str, Any], title: str) -> bytes | None:
    """``added_neighbours`` on the test users as the similarity floor falls, the validation choices marked. Left:
    new-item against seen-item Recall@10 for every (anchor, slots), with the content baseline's new-item recall
    and 95% of the model's own seen-item recall as lines (placing first or last puts the same items in the top
    10, so one curve stands for both). Right: the same for NDCG@10, where the placement differs (the last-item
    anchor, first vs last places). None without the lever."""
    curves = out.get("added_neighbours_test_curves")
    if not curves:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def pos(p: dict[str, Any]) -> str:
        return p.get("position") or "top"

    by = {r["model"]: r for r in out["rows"]}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    for anchor, full in curves.items():
        curve = [p for p in full if not p.get("within")]  # the lines: the cosine floor alone
        for slots in sorted({p["slots"] for p in curve if p["slots"]}):
            pts = [curve[0]] + [p for p in curve if p["slots"] == slots and pos(p) == "top"]
            ax.plot([p["recall_at_10_seen"] for p in pts], [p["recall_at_10_new"] for p in pts], "o-", ms=3,
                    label=f"{anchor} item, {slots} slot{'s' if slots > 1 else ''}")
            if anchor == "last":
                for position, style in (("top", "o-"), ("bottom", "s--")):
                    pts = [curve[0]] + [p for p in curve if p["slots"] == slots and pos(p) == position]
                    bx.plot([p["ndcg_at_10_seen"] for p in pts], [p["ndcg_at_10_new"] for p in pts], style, ms=3,
                            label=f"{slots} slot{'s' if slots > 1 else ''}, {'first' if position == 'top' else 'last'}"
                                  " places")
        chosen = (out.get("added_neighbours_tuning") or {}).get(anchor, {}).get("chosen")
        if chosen:
            key = (chosen.get("position") or "top", chosen["slots"], chosen["min_cosine"], chosen.get("within") or 0)
            p = next(q for q in full if (pos(q), q["slots"], q["min_cosine"], q.get("within") or 0) == key)
            ax.plot([p["recall_at_10_seen"]], [p["recall_at_10_new"]], "k*", ms=12)
            if anchor == "last":
                bx.plot([p["ndcg_at_10_seen"]], [p["ndcg_at_10_new"]], "k*", ms=12)
    content = by.get("content (last item's text neighbours)")
    if content:
        ax.axhline(content["recall_at_10_new"], color="gray", ls="--", label="content baseline, new items")
        bx.axhline(content["ndcg_at_10_new"], color="gray", ls="--", label="content baseline, new items")
    ax.axvline(0.95 * by["GRLM + new items"]["recall_at_10_seen"], color="gray", ls=":",
               label="95% of GRLM's seen-item R@10")
    ax.set_xlabel("Recall@10, seen-item targets (test)")
    ax.set_ylabel("Recall@10, new-item targets (test)")
    ax.set_title(title + "\n(* chosen on validation users; first or last places: the same top 10)", fontsize=9)
    bx.set_xlabel("NDCG@10, seen-item targets (test)")
    bx.set_ylabel("NDCG@10, new-item targets (test)")
    bx.set_title("NDCG@10, neighbours of the last item: first vs last places", fontsize=9)
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _log(cfg: GrlmConfig, out: dict[str, Any]) -> str | None:
    """One MLflow run (grlm.stage=bench-cold-start): every model's metrics, the table and the plot."""
    if not cfg.tracking.enabled:
        return None
    import mlflow

    from grlm_ray.core.tracking import log_bytes, metric_key, open_run, run_name

    with open_run(cfg, "bench-cold-start", run_name(cfg, f"bench-cold-start-{cfg.bench.mode}")) as r:
        mlflow.log_params({"bench/mode": cfg.bench.mode, "holdout/share": cfg.data.holdout.share,
                           "holdout/candidates": cfg.data.holdout.candidates, "holdout/seed": cfg.data.holdout.seed,
                           "bench/users": out["protocol"]["users"]})
        for row in out["rows"]:
            for key, v in row.items():
                if key != "model" and isinstance(v, (int, float)):
                    mlflow.log_metric(metric_key(f"{row['model']}/{key}".replace(" ", "_")), float(v))
        mlflow.log_dict(out, "cold_start.json")
        log_bytes(plot(out["rows"], f"{cfg.run.name}: cold start ({cfg.bench.mode})"), "cold_start.png")
        return r.info.run_id


def add_args(ap: Any) -> None:
    ap.add_argument("args", nargs="*", metavar="CONFIG [key=value]",
                    help="e.g. configs/bench/beauty_cold_start.yaml bench.mode=full")
    ap.add_argument("--out-dir", default=None, help="default: the config's bench.out_dir")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the term writer")


def run(args: Any) -> dict[str, Any]:
    from grlm_ray.bench.common import DEFAULT_OUT
    from grlm_ray.core.config import load_config, split_args

    path, overrides = split_args(args.args, required=False)
    cfg = load_config(path, overrides)
    result = cold_start(cfg, args.threads)
    result["config"] = path
    result["overrides"] = overrides
    result["command"] = " ".join(["grlm bench cold-start", *args.args])
    result["out_dir"] = args.out_dir or cfg.bench.out_dir or DEFAULT_OUT
    dataset = "_".join(cfg.data.domains)
    result["file_name"] = f"cold_start_{dataset}" + ("" if cfg.bench.mode == "full" else f"_{cfg.bench.mode}")
    png = Path(result["out_dir"]) / f"{result['file_name']}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(plot(result["rows"], f"{cfg.run.name}: cold start, {result['protocol']['users']} test users "
                                         f"({result['protocol']['new_target_share']:.1%} with a new next item)"))
    result["plot"] = str(png)
    frontier = plot_frontier(result, f"{cfg.run.name}: new items placed by text neighbours")
    if frontier is not None:
        path = png.with_name(f"{result['file_name']}_neighbours.png")
        path.write_bytes(frontier)
        result["plot_neighbours"] = str(path)
    return result
