"""The cold-start protocol: held-out items leave everything training reads, test targets stay, the numbers of
a refused request are named; and the benchmark end to end on the tiny synthetic run (a real training, real
term writing, real evaluation with the new items in the trie)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from grlm_ray.core.config import load_config
from grlm_ray.core.errors import ConfigError, DataError
from grlm_ray.core.schemas import ITEMS
from grlm_ray.stages.prepare import core


def _catalog(n_items: int, seqs: dict[str, list[str]], stamps: dict[str, list[int]] | None = None):
    ids = [f"i{k}" for k in range(n_items)]
    items = pa.table({"item_id": ids, "category": ["c"] * n_items, "title": [f"title {k}" for k in range(n_items)],
                      "description": [""] * n_items, "brand": [""] * n_items,
                      "categories": pa.array([[]] * n_items, pa.list_(pa.string())), "source_id": ids},
                     schema=ITEMS.arrow)
    users = sorted(seqs)
    sequences = pa.table({"user_id": users, "item_ids": pa.array([seqs[u] for u in users], pa.list_(pa.string())),
                          "timestamps": pa.array([(stamps or {}).get(u) for u in users], pa.list_(pa.int64()))})
    return items, sequences, core.leave_one_out_targets(sequences, "d")


def _seqs() -> dict[str, list[str]]:
    # mean relative positions: i9 1.0, i8 0.72, then i7 0.58: i8 and i9 arrived last
    return {"u0": ["i0", "i1", "i2", "i9"], "u1": ["i1", "i3", "i4", "i5", "i8"], "u2": ["i2", "i6", "i8", "i9"],
            "u3": ["i0", "i5", "i7", "i3", "i4"], "u4": ["i3", "i8", "i9"], "u5": ["i4", "i6", "i7", "i1"]}


def test_held_out_items_leave_every_history_but_test_targets_stay():
    items, seqs, targets = _catalog(10, _seqs())
    h = core.hold_out(items, seqs, targets, share=0.2, candidates=0.2, seed=0)
    held = set(h.held.column("item_id").to_pylist())
    assert held == {"i8", "i9"}  # the two latest arrivals
    assert set(h.items.column("item_id").to_pylist()) == {f"i{k}" for k in range(8)}
    by_user = dict(zip(h.sequences.column("user_id").to_pylist(), h.sequences.column("item_ids").to_pylist()))
    # the test target (last item) stays what it was; held-out items leave every earlier position
    assert by_user["u0"] == ["i0", "i1", "i2", "i9"] and by_user["u1"] == ["i1", "i3", "i4", "i5", "i8"]
    assert by_user["u2"] == ["i2", "i6", "i9"]
    assert "u4" not in by_user  # ["i3", "i9"]: fewer than 3 items, dropped and counted
    t = h.targets.to_pylist()
    for r in t:
        history = by_user[r["user_id"]][: r["position"]]
        assert not held & set(history)
        if r["split"] == "valid":
            assert r["target_item_id"] not in held
    assert h.info["users_dropped_below_min"] == 1 and h.info["held_out_items"] == 2
    assert h.info["test_targets_new"] == 3 and h.info["test_targets_seen"] == 2
    assert h.info["interactions_removed"] == 2  # u2's i8 and u4's i8 (u4 then dropped)
    assert h.info["arrival"].startswith("mean relative position")
    # u2's validation target was i8, a held-out item: kept apart as a real arrival on validation, with its
    # history (the seen items before the test target), not in the targets training and evaluation read
    assert h.arrival_targets.to_pylist() == [{"user_id": "u2", "split": "valid", "domain": "d", "position": 2,
                                              "target_item_id": "i8"}]
    assert h.info["valid_targets_new"] == 1


def test_timestamps_decide_arrival_when_every_user_has_them():
    seqs = {"a": ["i0", "i1", "i2"], "b": ["i1", "i2", "i3"]}
    stamps = {"a": [1, 2, 9], "b": [3, 4, 5]}
    items, s, targets = _catalog(4, seqs, stamps)
    scores, rule = core.arrival_scores(s)
    assert rule == "first timestamp" and scores["i3"] == 5 and scores["i2"] == 4
    h = core.hold_out(items, s, targets, share=0.25, candidates=0.25, seed=0)
    assert h.held.column("item_id").to_pylist() == ["i3"]  # first seen at 5: the latest arrival


def test_a_share_the_catalog_cannot_give_is_refused_with_the_numbers():
    items, seqs, targets = _catalog(10, _seqs())
    with pytest.raises(DataError, match=r"3 items asked for \(share 0.3 of 10\) but only 2 candidates"):
        core.hold_out(items, seqs, targets, share=0.3, candidates=0.2, seed=0)
    with pytest.raises(DataError, match="holds out no item"):
        core.hold_out(items, seqs, targets, share=0.01, candidates=0.2, seed=0)
    with pytest.raises(ConfigError, match="more than the candidates"):
        load_config(None, ["data.holdout.share=0.3", "data.holdout.candidates=0.2"])


def test_the_seed_picks_which_candidates_are_held_out():
    items, seqs, targets = _catalog(10, _seqs())
    picks = {tuple(core.hold_out(items, seqs, targets, 0.1, 0.5, seed).held.column("item_id").to_pylist())
             for seed in range(12)}
    assert len(picks) > 1 and all(len(p) == 1 for p in picks)


@pytest.mark.ray
@pytest.mark.slow
def test_cold_start_benchmark_recommends_new_items_with_their_written_tids(tiny_sft_run, tmp_path):
    from conftest import TINY

    from grlm_ray.cli import main as cli_main

    overrides = tiny_sft_run + TINY + [
        "run.name=cold", "data.holdout.share=0.1", "data.holdout.candidates=0.3", "ctg.method=lexical",
        "ctg.limit=null", "ctg.lead=brand",
        # the bench is tested here, not DDP: one training process (no Ray Train start)
        "train.strategy=single", "train.num_workers=1", "train.max_steps=30", "bench.sample_users=80", "bench.baselines=[sasrec_ce]",
        "baseline.epochs=2", "baseline.hidden_size=16", "eval.num_beams=10", "eval.ks=[5,10]", "eval.batch_size=8",
        "bench.new_item_levers=[known_terms,added_search,added_neighbours]", "bench.new_item_beams=5",
        "bench.new_item_cost=0.9", "bench.content_fills=[2,4]", "bench.neighbour_choice=arrivals"]
    assert cli_main(["bench", "cold-start", "--out-dir", str(tmp_path), *overrides]) == 0
    [path] = tmp_path.glob("cold_start_demo_sample.json")
    res = json.loads(path.read_text())
    rows = {r["model"]: r for r in res["rows"]}
    fill = res["content_fill_tuning"]  # eval.content_fill on the validation users, then the placement on top of it
    assert [q["content_fill"] for q in fill["points"]] == [0, 2, 4] and fill["users"] == 80
    assert fill["chosen"] == max(fill["points"], key=lambda q: (q["recall_at_10"], q["ndcg_at_10"],
                                                                 -q["content_fill"]))["content_fill"]
    f = fill["chosen"]
    if f:  # the placement's cost on the filled lists counts from the same filled lists without the new items
        ref = fill["neighbours"]["reference"]
        assert ref["users_seen"] == 80 and ref["new_share_at_10"] == 0
        if fill["neighbours"]["chosen"]:
            key_ = lambda p: (p["position"], p["slots"], p["min_cosine"], p["within"])  # noqa: E731
            [pt] = [p for p in fill["neighbours"]["curve"] if key_(p) == key_(fill["neighbours"]["chosen"])]
            assert pt["recall_at_10"] >= 0.1 * ref["recall_at_10"] - 1e-9
    filled = [f"GRLM, new items absent + {f} text neighbours", f"GRLM + new items + {f} text neighbours",
              *([f"GRLM + new items, text neighbours of the last item + {f} text neighbours"]
                if f and fill["neighbours"]["chosen"] else [])] if f else []
    assert list(rows) == ["GRLM + new items", "GRLM + new items, known terms", "GRLM + new items, added-item search",
                          "GRLM, new items absent", "SASRec-CE", "popularity", "content (last item's text neighbours)",
                          "GRLM + new items, text neighbours of the last item", *filled]
    if f:  # the fill over a catalog without the new items never shows one
        assert rows[filled[0]]["new_share_at_10"] == 0 and rows[filled[1]]["users_new"] == rows["GRLM + new items"]["users_new"]
        assert set(res["ratios"]["content_fill_rows"]) == set(filled[1:])
    # the added-item search: its bonus chosen on validation users (no new item is a validation target), the
    # largest within the allowed cost; it shows new items at least as often as the search off
    tune = res["added_search_tuning"]
    assert tune["split"] == "valid" and tune["users"] == 80 and tune["curve"][0]["bonus"] is None
    off = tune["curve"][0]["recall_at_10"]
    chosen = [p for p in tune["curve"] if p["bonus"] == tune["chosen_bonus"]][0]
    assert chosen["recall_at_10"] >= 0.1 * off - 1e-9
    assert all(p["bonus"] <= chosen["bonus"] or p["recall_at_10"] < 0.1 * off for p in tune["curve"][1:])
    assert tune["curve"][0]["new_share_at_10"] <= chosen["new_share_at_10"]
    s_ = rows["GRLM + new items, added-item search"]
    assert s_["new_share_at_10"] > 0 and s_["users_new"] == rows["GRLM + new items"]["users_new"]
    # the text-neighbour placement: chosen by the real arrivals on validation (the users whose validation target
    # was a held-out item) within the cost on the same validation users, the whole test curve recorded; the
    # model's top item is not an anchor this choice has (it would need the model on those users' histories)
    arrivals = res["added_neighbours_tuning"]["real_arrivals"]
    assert arrivals["users"] == res["protocol"]["valid_targets_new"] > 0 and 0 <= arrivals["content_recall"] <= 1
    assert "predicted" not in res["added_neighbours_tuning"] and set(res["added_neighbours_test_curves"]) == \
        {"last", "predicted"}
    for anchor, name in (("last", "GRLM + new items, text neighbours of the last item"),):
        t_ = res["added_neighbours_tuning"][anchor]
        assert t_["chosen_by_share"] and t_["chosen_by_simulated"]  # the other choices, recorded beside it
        ok = [p for p in t_["curve"][1:] if p["recall_at_10"] >= 0.1 * t_["curve"][0]["recall_at_10"] - 1e-9
              and p["new_share_at_10"] > t_["curve"][0]["new_share_at_10"]]
        rule = lambda p: (p["position"], p["slots"], p["min_cosine"], p["within"])  # noqa: E731
        assert max(p["arrival_new_recall"] for p in ok) == max(p["arrival_new_recall"] for p in t_["curve"]
                                                               if rule(p) == rule(t_["chosen"]))
        assert res["added_neighbours_tuning"]["users"] == 80 and t_["curve"][0]["slots"] == 0
        key = lambda p: (p["position"], p["slots"], p["min_cosine"], p["within"])  # noqa: E731
        assert {p["position"] for p in t_["curve"][1:]} == {"top", "bottom"}  # both placements on the curve
        assert {p["within"] for p in t_["curve"][1:]} == {0, 10, 20}  # and every rank gate (0: none)
        pick = [p for p in t_["curve"] if key(p) == key(t_["chosen"])][0]
        assert pick["recall_at_10"] >= 0.1 * t_["curve"][0]["recall_at_10"] - 1e-9
        assert pick["new_share_at_10"] >= t_["curve"][0]["new_share_at_10"]
        test_point = [p for p in res["added_neighbours_test_curves"][anchor]
                      if key(p) == key(pick)][0]
        assert {k: rows[name][k] for k in ("recall_at_10_new", "new_share_at_10")} == \
               {k: test_point[k] for k in ("recall_at_10_new", "new_share_at_10")}
        assert rows[name]["users_new"] == rows["GRLM + new items"]["users_new"]
    lever = res["levers"]["GRLM + new items, known terms"]
    assert lever["in_trie_and_index"] == 12 and lever["every_term_known"] >= res["new_items"]["every_term_known"]
    p = res["protocol"]
    assert p["held_out_items"] == 12 and p["users"] == 80 and p["test_targets_new"] > 0
    g, a = rows["GRLM + new items"], rows["GRLM, new items absent"]
    assert g["users_new"] + g["users_seen"] == 80 and g["users_new"] > 0
    assert all(r["users_new"] == g["users_new"] for r in rows.values())  # the same users for every model
    # without the new items in the catalog nothing can recommend them; with them, the trie reaches them
    assert a["new_share_at_10"] == 0 and a["recall_at_10_new"] == 0
    assert rows["popularity"]["new_share_at_10"] == 0
    assert g["new_share_at_10"] > 0  # the new TIDs (brand first, as the seen ones) are in the trie and reached
    assert res["new_items"]["first_term_written_first"] == 1.0
    assert rows["content (last item's text neighbours)"]["new_share_at_10"] > 0
    assert res["new_items"]["items"] == res["new_items"]["in_trie_and_index"] == 12
    assert res["new_items"]["without_text"] == 0
    assert 0 <= res["new_items"]["first_term_written_first"] <= 1
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG" and res["mlflow_run_id"]
    assert (tmp_path / "cold_start_demo_sample_neighbours.png").read_bytes()[:4] == b"\x89PNG"  # the frontier
    # a second call reuses every stage and the written TIDs: the same table
    assert cli_main(["bench", "cold-start", "--out-dir", str(tmp_path), *overrides]) == 0
    again = json.loads(path.read_text())
    assert [{k: v for k, v in r.items() if k != "eval_s"} for r in again["rows"]] == \
           [{k: v for k, v in r.items() if k != "eval_s"} for r in res["rows"]]
    assert again["new_items"]["written"] == 0
    # the added-item search's validation beams too: read back, not decoded again, the same curve
    assert not res["added_search_tuning"]["beams_reused"] and again["added_search_tuning"]["beams_reused"]
    assert again["added_search_tuning"]["curve"] == res["added_search_tuning"]["curve"]
    # the eval stage's switch gives the bench's row: the chosen placement scored by `grlm eval` itself
    from grlm_ray.core.run import Run
    from grlm_ray.flows.pipeline import run_pipeline

    plain = Run.of(load_config(None, overrides + ["run.name=cold-sample-new"])).read_table("eval", "predictions.parquet")

    pick = res["added_neighbours_tuning"]["last"]["chosen"]
    ecfg = load_config(None, ecfg_overrides(overrides, pick))
    ev = run_pipeline(ecfg, stages=("eval",))["stages"]["eval"]
    row = rows["GRLM + new items, text neighbours of the last item"]
    assert ev["info"]["metrics"]["recall_at_10"] == pytest.approx(row["recall_at_10"], abs=1e-6)
    assert ev["info"]["metrics"]["ndcg_at_10"] == pytest.approx(row["ndcg_at_10"], abs=1e-6)
    assert ev["info"]["protocol"]["added_neighbours"] == {"slots": pick["slots"], "min_cosine": pick["min_cosine"],
                                                          "position": pick["position"], "anchor": "last",
                                                          "within": pick["within"] or None}
    # the rank gate through the eval stage (eval.added_within=10, a low floor: the gate decides) scores as the
    # bench's test curve point with the same settings
    gated = dict(pick, within=10, min_cosine=0.5, slots=3)
    ev10 = run_pipeline(load_config(None, ecfg_overrides(overrides, gated)), stages=("eval",))["stages"]["eval"]
    [point] = [p for p in res["added_neighbours_test_curves"]["last"] if key(p) == key(gated)]
    assert ev10["info"]["metrics"]["recall_at_10"] == pytest.approx(point["recall_at_10"], abs=1e-6)
    assert ev10["info"]["metrics"]["ndcg_at_10"] == pytest.approx(point["ndcg_at_10"], abs=1e-6)
    ungated = [p for p in res["added_neighbours_test_curves"]["last"] if key(p) == key(dict(gated, within=0))][0]
    assert point["new_share_at_10"] <= ungated["new_share_at_10"]  # the gate only ever removes new items
    # placement then eval.content_fill=3 in the eval stage: the plain lists placed, then their last 3 places of 10
    # given to the last item's text neighbours among every item, the new ones too (the bench's content baseline)
    from grlm_ray.bench.cold_start import content_rankings, held_out_rows, last_items
    from grlm_ray.lib.embeddings import catalog_embeddings
    from grlm_ray.lib.eig import TextNeighbours, fill_content, placement_depth

    both = load_config(None, [*ecfg_overrides(overrides, pick), "eval.content_fill=3"])
    run_pipeline(both, stages=("eval",))
    got = Run.of(both).read_table("eval", "predictions.parquet")
    users = plain.column("user_id").to_pylist()
    assert got.column("user_id").to_pylist() == users
    rows_new, _ = held_out_rows(Run.of(both))
    ids, emb = catalog_embeddings(both, rows_new)
    last = last_items(both, users)
    placer = TextNeighbours(ids, emb, [r["item_id"] for r in rows_new])
    floors = TextNeighbours(ids, emb, ids).floors(last, pick["within"]) if pick["within"] else None
    placed = placer.place(plain.column("ranked_item_ids").to_pylist(), last, pick["min_cosine"], pick["slots"],
                          pick["position"], floors, placement_depth(10, 3))  # 'bottom': above the fill's places
    want = [fill_content(r, c, 3, 10) for r, c in zip(placed, content_rankings(ids, emb, last, 10))]
    assert got.column("ranked_item_ids").to_pylist() == want
    assert any("content_neighbour" in h for h in got.column("grounded_by").to_pylist())


def ecfg_overrides(overrides, pick):
    return overrides + ["run.name=cold-sample-new", "eval.added_items=true", "eval.limit_users=80",
                        f"eval.added_neighbours={pick['slots']}", f"eval.added_min_cosine={pick['min_cosine']}",
                        f"eval.added_position={pick['position']}", f"eval.added_within={pick['within']}"]


def test_scoring_added_items_without_any_added_is_refused_with_the_path(tmp_path):
    from grlm_ray.core.errors import GrlmError
    from grlm_ray.core.run import Run
    from grlm_ray.stages.evaluate import added_items

    with pytest.raises(GrlmError, match=r"eval.added_items=true but .*r1/serve/catalog_updates.parquet does not exist"):
        added_items(Run(str(tmp_path), "r1"))


def test_a_vocabulary_keeps_a_new_items_tid_to_known_words_while_they_make_n_terms():
    from grlm_ray.lib.lexical import LexicalTermWriter

    def item(i, title):
        return {"item_id": i, "title": title, "description": "", "brand": "", "category": "Beauty", "categories": []}

    catalog = [item("a", "Gentle Shampoo for Dry Hair"), item("b", "Gentle Conditioner for Dry Hair"),
               item("c", "Zorbix Volumizing Shampoo with Argan")]
    w = LexicalTermWriter(catalog, {"c": ["a", "b"]}, num_terms=4, lead="type")
    assert w.tid("c") == ["shampoo", "zorbix", "volumize", "argan"]  # open: its own rare words distinguish it
    w.vocabulary = frozenset({"shampoo", "gentle", "dry", "hair", "argan"})
    # known words only: its own known words, then the words its neighbours share
    assert w.tid("c") == ["shampoo", "dry", "gentle", "argan"]
    w.vocabulary = frozenset()  # nothing known: the item's own words after all
    assert w.tid("c") == ["shampoo", "zorbix", "volumize", "argan"]


def test_serve_load_adds_a_cold_start_runs_held_out_items_with_the_histories_of_their_buyers(tmp_path):
    from grlm_ray.bench.serve_load import _buyers_summary, held_out_updates
    from grlm_ray.core.run import Run
    from grlm_ray.core.schemas import SEQUENCES, TARGETS

    items, seqs, targets = _catalog(10, _seqs())
    h = core.hold_out(items, seqs, targets, share=0.2, candidates=0.2, seed=0)
    run = Run(str(tmp_path), "r")
    store = run.store
    assert held_out_updates(run, 4, 20) == []  # not a cold-start run: the bench's own items
    store.write_table("r/prepare/holdout_items.parquet", h.held, ITEMS)
    store.write_table("r/prepare/sequences.parquet", h.sequences, SEQUENCES)
    store.write_table("r/prepare/targets.parquet", h.targets, TARGETS)
    got = held_out_updates(run, 4, 20)
    # i9 is the next purchase of u0 and u2, i8 of u1: most buyers first, each with the buyers' histories
    assert [(it["item_id"], it["title"], hs) for it, hs in got] == [
        ("i9", "title 9", [["i0", "i1", "i2"], ["i2", "i6"]]), ("i8", "title 8", [["i1", "i3", "i4", "i5"]])]
    assert _buyers_summary([{"buyers": 2, "buyers_hit": 1}, {"buyers": 1, "buyers_hit": 0}, {"buyers": 0}], 10) == \
        {"items": 2, "buyers": 3, "buyers_hit": 1, "hit_rate_at_10": 0.3333}


def test_added_neighbours_go_first_when_near_enough_and_are_never_repeated():
    from grlm_ray.lib.eig import place_added

    ranked = ["a", "n2", "b", "c"]
    cands = [("n1", 0.7), ("n2", 0.95), ("n3", 0.9)]
    assert place_added(ranked, cands, 0.8, 2) == ["n2", "n3", "a", "b", "c"]  # best first, n2 moved up
    assert place_added(ranked, cands, 0.8, 1) == ["n2", "a", "b", "c"]
    assert place_added(ranked, cands, 0.99, 3) == ranked  # none near enough: the list as it was
    assert place_added(ranked, cands, 0.0, 0) == ranked


def test_added_neighbours_at_the_bottom_push_out_the_models_least_likely_items_only():
    from grlm_ray.lib.eig import place_added

    ranked = ["a", "b", "c", "d", "e", "f"]
    cands = [("n1", 0.7), ("n2", 0.95), ("n3", 0.9)]
    # the first 4 are shown: n2 and n3 take its last two places, c and d move just below it, in order
    assert place_added(ranked, cands, 0.8, 2, "bottom", 4) == ["a", "b", "n2", "n3", "c", "d", "e", "f"]
    assert place_added(ranked, cands, 0.8, 1, "bottom", 4) == ["a", "b", "c", "n2", "d", "e", "f"]
    # a candidate the model already shows keeps its place; only the other one pushes an item out
    shown = ["a", "n3", "b", "c", "d"]
    assert place_added(shown, cands, 0.8, 2, "bottom", 4) == ["a", "n3", "b", "n2", "c", "d"]
    # a candidate below the shown part moves up into it, and is not repeated
    assert place_added(["a", "b", "c", "n2"], cands, 0.9, 1, "bottom", 2) == ["a", "n2", "b", "c"]
    assert place_added(ranked, cands, 0.8, 2, "bottom") == ["a", "b", "c", "d", "n2", "n3", "e", "f"]  # all shown
    assert place_added(ranked, cands, 0.99, 3, "bottom", 4) == ranked
    with pytest.raises(ValueError, match="position must be 'top' or 'bottom'"):
        place_added(ranked, cands, 0.8, 1, "middle")


def test_a_bottom_placement_with_the_content_fill_takes_the_places_above_the_fill():
    from grlm_ray.lib.eig import fill_content, place_added, placement_depth

    ranked = [f"m{i}" for i in range(12)]
    cands = [("n1", 0.9), ("n2", 0.8), ("n3", 0.7)]
    content = ["c1", "c2", "n1", "c3"]
    # 3 new items with a fill of 3: they take places 5-7, the fill 8-10 — none taken back by the fill
    got = fill_content(place_added(ranked, cands, 0.5, 3, "bottom", placement_depth(10, 3)), content, 3, 10)
    assert got[:10] == ["m0", "m1", "m2", "m3", "n1", "n2", "n3", "c1", "c2", "c3"]
    # placed in the fill's own places instead, the fill would take all three back: the lists are the same
    plain = fill_content(ranked, content, 3, 10)
    assert fill_content(place_added(ranked, cands, 0.5, 3, "bottom", 10), content, 3, 10)[:10] == plain[:10]
    assert placement_depth(10, 0) == 10 and placement_depth(10, 3) == 7 and placement_depth(3, 5) == 1
    # 'top' is not moved by the fill
    assert fill_content(place_added(ranked, cands, 0.5, 2, "top", placement_depth(10, 3)), content, 3, 10)[:3] == \
        ["n1", "n2", "m0"]


def test_neighbour_candidates_skip_the_anchor_and_the_choice_keeps_the_cost():
    import numpy as np

    from grlm_ray.bench.cold_start import choose_neighbours
    from grlm_ray.lib.eig import TextNeighbours

    ids = ["s1", "s2", "n1", "n2"]
    emb = np.array([[1, 0], [0, 1], [0.8, 0.6], [0.6, 0.8]], dtype=np.float32)
    got = TextNeighbours(ids, emb, ["n1", "n2"]).candidates(["s1", "n1"], 2)
    assert [i for i, _ in got[0]] == ["n1", "n2"] and abs(got[0][0][1] - 0.8) < 1e-6
    assert [i for i, _ in got[1]] == ["n2"] and abs(got[1][0][1] - 0.96) < 1e-6  # n1 is the anchor: skipped
    curve = [{"recall_at_10": 0.10, "new_share_at_10": 0.0}, {"recall_at_10": 0.099, "new_share_at_10": 0.02},
             {"recall_at_10": 0.095, "new_share_at_10": 0.05}, {"recall_at_10": 0.05, "new_share_at_10": 0.3}]
    assert choose_neighbours(curve, 0.02) is curve[1]
    assert choose_neighbours(curve, 0.06) is curve[2]
    assert choose_neighbours([curve[0], curve[3]], 0.02) is None
    # measured against another base (the same filled lists without the new items, higher than the lever off):
    # the cost counts from there, so a point within 6% of the lever off can be outside 6% of it
    assert choose_neighbours(curve, 0.06, base=0.102) is curve[1]
    assert choose_neighbours(curve, 0.02, base=0.102) is None
    # a rule showing no more new items than the lever off is never chosen, however many arrivals it simulates
    noop = {"recall_at_10": 0.10, "ndcg_at_10": 0.05, "new_share_at_10": 0.0, "simulated_new_recall": 0.9}
    sims = [dict(p, simulated_new_recall=0.1, ndcg_at_10=0.05) for p in curve]
    assert choose_neighbours([sims[0], noop, sims[1]], 0.02, "simulated") is sims[1]
    assert choose_neighbours([sims[0], noop], 0.02, "simulated") is None


def _choice_curve(estimate: str) -> list[dict]:
    """A validation curve (the lever off first) where the rule showing the most new items within a 3% cost is
    not the one finding the most arrivals (``estimate``: the curve points' new-item recall)."""
    points = [(0.10, 0.05, 0.0, 0.0), (0.099, 0.05, 0.08, 0.03), (0.098, 0.05, 0.05, 0.06), (0.05, 0.02, 0.3, 0.2)]
    return [{"recall_at_10": r, "ndcg_at_10": n, "new_share_at_10": sh, estimate: e} for r, n, sh, e in points]


def test_simulated_arrivals_count_the_pool_targets_a_rule_would_show_and_drive_the_choice():
    import numpy as np

    from grlm_ray.bench.cold_start import choose_neighbours, simulate_arrivals

    ids = ["a", "b", "p1", "p2", "p3"]
    emb = np.array([[1, 0], [0, 1], [0.98, 0.2], [0.8, 0.6], [0.1, 0.99]], dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    anchors, targets = ["a", "a", "b", "a"], ["p1", "p2", "p3", "b"]  # the last user's target is in no pool
    floors = {10: [0.9, 0.9, -np.inf, 0.9]}  # the rank gate: only items scoring >= 0.9 are within 10
    sim = simulate_arrivals(anchors, targets, [["p1", "p2", "p3"]], ids, emb, floors)
    assert sim[(0, 1, 0.5)] == {"recall": round(2 / 3, 6), "users": 3}  # p1 for a (p2 is second), p3 for b
    assert sim[(0, 2, 0.5)]["recall"] == 1.0
    assert sim[(10, 2, 0.5)]["recall"] == round(2 / 3, 6)  # p2 (0.8 from a) is outside a's 10 nearest
    assert sim[(0, 3, 0.95)]["recall"] == round(2 / 3, 6)  # p1 0.98, p3 0.99 pass; p2 does not
    # two pools: users pooled over both
    two = simulate_arrivals(anchors, targets, [["p1"], ["p2", "b"]], ids, emb, floors)
    assert two[(0, 1, 0.5)] == {"recall": round(2 / 3, 6), "users": 3}  # p1 hit; p2 hit; b's is the anchor a's 2nd
    # with the histories, a pool's members leave them first (as the holdout takes the real arrivals out): a user
    # whose last item is p1, in the same pool as their target p3, is anchored on the item before it instead
    from grlm_ray.core.errors import GrlmError
    from grlm_ray.lib.eig import TextNeighbours

    near = TextNeighbours(ids, emb, ids)
    hists = [["b", "a"], ["a"], ["b", "p1"], ["a"]]
    masked = simulate_arrivals([], targets, [["p1", "p2", "p3"]], ids, emb, {}, histories=hists, near=near)
    assert masked[(0, 1, 0.5)]["recall"] == round(2 / 3, 6)  # p3 found from b (p1 is gone from the history)
    unmasked = simulate_arrivals(["a", "a", "p1", "a"], targets, [["p1", "p2", "p3"]], ids, emb,
                                 near.floors_at(["a", "a", "p1", "a"], [10]))
    assert unmasked[(0, 1, 0.5)]["recall"] == round(1 / 3, 6)  # anchored on p1: p2 is nearer it than p3
    assert masked[(0, 3, 0.5)]["users"] == 3
    assert masked[(10, 1, 0.5)]["recall"] == round(2 / 3, 6)  # 5 items: every one is within 10
    with pytest.raises(GrlmError, match="near"):
        simulate_arrivals([], targets, [["p1"]], ids, emb, {}, histories=hists)
    # the simulated choice takes the rule finding the most arrivals within the cost, not the one showing most
    curve = _choice_curve("simulated_new_recall")
    assert choose_neighbours(curve, 0.03, "share") is curve[1]
    assert choose_neighbours(curve, 0.03, "simulated") is curve[2]
    # the same rule first or last: with the content fill the last places go to the fill, so fewer new items show
    top = {**curve[2], "position": "top", "new_share_at_10": 0.05}
    bottom = {**curve[2], "position": "bottom", "new_share_at_10": 0.01, "ndcg_at_10": 0.06}
    assert choose_neighbours([curve[0], bottom, top], 0.03, "simulated") is top
    assert choose_neighbours([curve[0], top, {**bottom, "new_share_at_10": 0.05}], 0.03, "simulated")["position"] \
        == "bottom"  # the same share: the better seen NDCG


def test_real_arrivals_on_validation_count_the_buyers_a_rule_shows_their_new_item_and_drive_the_choice():
    import numpy as np

    from grlm_ray.bench.cold_start import arrival_recalls, choose_neighbours
    from grlm_ray.lib.eig import TextNeighbours

    # a, b seen; n1, n2, n3 the new items. Three buyers: anchored on a they bought n1 (a's nearest new item)
    # and n2 (its second), anchored on b n3
    ids = ["a", "b", "s1", "n1", "n2", "n3"]
    emb = np.array([[1, 0], [0, 1], [0.99, 0.1], [0.97, 0.25], [0.8, 0.6], [0.2, 0.98]], dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    placer, near = TextNeighbours(ids, emb, ["n1", "n2", "n3"]), TextNeighbours(ids, emb, ids)
    anchors, want = ["a", "a", "b"], ["n1", "n2", "n3"]
    got = arrival_recalls(anchors, want, placer, near, [1, 2])
    assert got["users"] == 3 and got["fill"] == 0
    assert got["last"][(0, 1, 0.5)]["recall"] == round(2 / 3, 6)  # n1 for a, n3 for b; n2 needs a second slot
    assert got["last"][(0, 2, 0.5)]["recall"] == 1.0
    assert got["last"][(0, 2, 0.95)]["recall"] == round(2 / 3, 6)  # n2 is 0.8 from a: below the floor
    assert got["last"][(10, 2, 0.5)]["recall"] == 1.0  # 6 items: every one is within 10
    # the content baseline on the same buyers: the anchor's nearest items of the whole catalog (10 of 5 others)
    assert got["content_recall"] == 1.0
    # with a fill of 2, the rule's item takes the last place above it, then the fill shows the anchor's nearest
    # items not shown yet (a: s1, then n2 — n1 is placed): n2's buyer is found by the fill
    assert got["last"][(0, 1, 0.95)]["recall"] == round(2 / 3, 6)
    filled = arrival_recalls(anchors, want, placer, near, [1], fill=2)
    assert filled["fill"] == 2 and filled["last"][(0, 1, 0.95)]["recall"] == 1.0
    # the arrivals choice takes the rule finding the most real arrivals within the cost
    curve = _choice_curve("arrival_new_recall")
    assert choose_neighbours(curve, 0.03, "arrivals") is curve[2]
    assert choose_neighbours(curve, 0.03, "share") is curve[1]


def test_the_slot_grid_is_the_configs_and_a_fourth_slot_reaches_a_fourth_arrival():
    import numpy as np
    import pytest

    from grlm_ray.bench.cold_start import neighbour_curve, simulate_arrivals
    from grlm_ray.core.config import BenchConfig

    ids = ["a", "p1", "p2", "p3", "p4"]
    emb = np.array([[1, 0], [0.99, 0.14], [0.98, 0.2], [0.95, 0.31], [0.9, 0.44]], dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    anchors, targets = ["a"] * 4, ["p1", "p2", "p3", "p4"]
    sim = simulate_arrivals(anchors, targets, [["p1", "p2", "p3", "p4"]], ids, emb, {}, slot_counts=[3, 4])
    assert sorted({s for _, s, _ in sim}) == [3, 4]
    assert sim[(0, 3, 0.5)]["recall"] == 0.75 and sim[(0, 4, 0.5)]["recall"] == 1.0
    # the validation curve covers exactly the configured slot counts (the first point: the lever off)
    rows = [("x", [f"s{j}" for j in range(10)])]
    cands = [[("p1", 0.99), ("p2", 0.98), ("p3", 0.95), ("p4", 0.9)]]
    curve = neighbour_curve(rows, cands, {"p1", "p2", "p3", "p4"}, slot_counts=[4])
    assert {p["slots"] for p in curve[1:]} == {4}
    assert max(p["new_share_at_10"] for p in curve[1:]) == 0.4  # four new items in the ten
    assert BenchConfig().neighbour_slots == [1, 2, 3]
    for bad in ([], [0], [11]):
        with pytest.raises(ValueError, match="bench.neighbour_slots"):
            BenchConfig(neighbour_slots=bad)


def test_content_fusion_keeps_grlms_first_items_and_fills_the_rest_from_content():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "isolation" / "content_fusion.py"
    spec = importlib.util.spec_from_file_location("content_fusion", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    grlm, content = ["a", "b", "c", "d"], ["c", "x", "a", "y", "z"]
    assert mod.fuse(grlm, content, 2, "grlm", 4) == ["a", "b", "c", "x"]  # content's a is already in: skipped
    assert mod.fuse(grlm, content, 2, "content", 4) == ["c", "x", "a", "b"]
    assert mod.fuse(grlm, content, 0, "grlm", 3) == ["c", "x", "a"]  # content alone
    assert mod.fuse(grlm, content, 4, "grlm", 4) == grlm  # GRLM alone


def test_the_rank_gate_places_an_added_item_only_among_the_anchors_nearest_catalog_items():
    """eval.added_within=D: of the added items near enough, only those among the D items of the whole catalog
    nearest the anchor (seen ones count) are placed — what the content baseline's top D would show."""
    import numpy as np

    from grlm_ray.lib.eig import TextNeighbours, gate

    ids = ["anchor", "s1", "s2", "n1", "n2"]
    v = {"anchor": [1.0, 0.0], "s1": [0.99, 0.141], "s2": [0.97, 0.243], "n1": [0.98, 0.199], "n2": [0.6, 0.8]}
    emb = np.array([np.array(v[i]) / np.linalg.norm(v[i]) for i in ids], dtype=np.float32)
    every, added = TextNeighbours(ids, emb, ids), TextNeighbours(ids, emb, ["n1", "n2"])
    # nearest the anchor: s1 0.99, n1 0.98, s2 0.97, n2 0.6
    assert every.ranked(["anchor"], 4) == [["s1", "n1", "s2", "n2"]]
    [f2], [f3] = every.floors(["anchor"], 2), every.floors(["anchor"], 3)
    assert f2 == pytest.approx(0.98, abs=1e-3) and f3 == pytest.approx(0.97, abs=1e-3)
    assert every.floors(["anchor"], 9) == [-np.inf] and every.floors([None], 2) == [-np.inf]
    assert every.floors_at(["anchor", None], [2, 3, 9]) == {2: [f2, -np.inf], 3: [f3, -np.inf], 9: [-np.inf, -np.inf]}
    [cands] = added.candidates(["anchor"], 2)
    assert [i for i, _ in gate([cands], [f2])[0]] == ["n1"]  # n2 is not among the 2 nearest: never placed
    assert [i for i, _ in gate([cands], [-np.inf])[0]] == ["n1", "n2"]
    ranked = [["a", "b", "c"]]
    assert added.place(ranked, ["anchor"], 0.5, 2, floors=[f2]) == [["n1", "a", "b"]]
    assert added.place(ranked, ["anchor"], 0.5, 2) == [["n1", "n2", "a"]]
