"""EIG on a hand-built catalog and metrics on hand-computed cases."""

import math

import pytest

from grlm_ray.lib.eig import DIRECT, FILL, STRUCTURAL, TidIndex
from grlm_ray.lib.metrics import dhr_at_k, ndcg_at_k, recall_at_k, score_rankings, vr_at_k

CATALOG = {
    "a": ["shampoo", "hair", "gentle", "woman", "organic"],
    "b": ["shampoo", "hair", "volume", "man", "salon"],
    "c": ["lipstick", "lip", "matte", "woman", "vegan"],
    "d": ["shampoo", "hair", "gentle", "woman", "organic"],  # collides with a
    "e": ["mascara", "lash", "volume", "woman", "waterproof"],
}


@pytest.fixture
def index():
    return TidIndex(list(CATALOG), list(CATALOG.values()), fallback_order=["e", "c", "b", "a", "d"])


def test_exact_hit_wins_and_returns_the_collision_group(index):
    items, how = index.ground_one("shampoo hair gentle woman organic")
    assert [index.item_ids[i] for i in items] == ["a", "d"] and how == DIRECT
    assert index.is_valid(["lipstick", "lip", "matte", "woman", "vegan"])
    assert not index.is_valid("lipstick lip matte woman")


def test_structural_scores_decay_with_position(index):
    # term 0 'shampoo' (w=1) matches a,b,d; term 3 'man' (w=1/4) only b -> b wins
    items, scores = index.structural(["shampoo", "x", "y", "man"], 5)
    assert index.item_ids[items[0]] == "b" and scores[0] == pytest.approx(1 + 1 / 4)
    # 'volume' at position 0 (w=1) beats 'lipstick' at position 1 (w=1/2)
    items, scores = index.structural(["volume", "lipstick"], 5)
    assert [index.item_ids[i] for i in items] == ["b", "e", "c"] and list(scores) == [1.0, 1.0, 0.5]


def test_ties_break_by_catalog_order(index):
    items, scores = index.structural(["woman"], 5)
    assert [index.item_ids[i] for i in items] == ["a", "c", "d", "e"]


def test_exact_equality_by_default_substring_as_option():
    idx = TidIndex(["p", "q"], [["nail-art", "glitter"], ["nail", "polish"]])
    items, _ = idx.structural(["nail"], 5)
    assert [idx.item_ids[i] for i in items] == ["q"]
    sub = TidIndex(["p", "q"], [["nail-art", "glitter"], ["nail", "polish"]], match="substring")
    items, scores = sub.structural(["nail"], 5)
    assert [sub.item_ids[i] for i in items] == ["q", "p"] and list(scores) == pytest.approx([1.0, 0.8])
    items, scores = sub.structural(["x", "nail-art-kit"], 5)  # catalog term inside the generated one
    assert [sub.item_ids[i] for i in items] == ["p", "q"] and list(scores) == pytest.approx([0.4, 0.4])


def test_rank_is_always_k_long_beams_in_order_no_duplicates(index):
    g = index.rank(["lipstick lip matte woman vegan", "shampoo hair gentle woman organic", "zzz"], 5)
    assert g.items[:3] == ["c", "a", "d"] and g.grounded_by[:3] == [DIRECT] * 3
    assert len(g.items) == 5 and len(set(g.items)) == 5
    assert set(g.grounded_by[3:]) <= {STRUCTURAL, FILL}
    g2 = index.rank(["nothing matches", "at all"], 3)
    assert g2.items == ["e", "c", "b"] and g2.grounded_by == [FILL] * 3  # popularity fallback
    g3 = index.rank(["shampoo volume"], 2)
    assert g3.items[0] == "b" and g3.grounded_by[0] == STRUCTURAL


def test_metrics_hand_computed():
    ranked = ["x", "t", "y"]
    assert recall_at_k(ranked, "t", 1) == 0 and recall_at_k(ranked, "t", 2) == 1
    assert ndcg_at_k(ranked, "t", 5) == pytest.approx(1 / math.log2(3))
    assert ndcg_at_k(ranked, "x", 5) == 1.0 and ndcg_at_k(ranked, "z", 5) == 0.0
    assert vr_at_k([True, False, True, True], 2) == 0.5
    assert dhr_at_k(["direct", "structural", "fill", "direct"], 4) == 0.5
    rows = [
        {"domain": "a", "target_item_id": "t", "ranked_item_ids": ["t", "x"], "grounded_by": ["direct", "fill"],
         "beam_valid": [True, False]},
        {"domain": "b", "target_item_id": "t", "ranked_item_ids": ["x", "y"], "grounded_by": ["fill", "fill"],
         "beam_valid": [False, False]},
    ]
    m = score_rankings(rows, ks=(1, 2))
    assert m["overall"]["recall_at_1"] == 0.5 and m["overall"]["users"] == 2
    assert m["per_domain"]["a"]["ndcg_at_2"] == 1.0 and m["per_domain"]["b"]["recall_at_2"] == 0.0
    assert m["overall"]["vr_at_2"] == 0.25 and m["overall"]["dhr_at_1"] == 0.5


@pytest.mark.parametrize("decay", ["reciprocal", "none"])
@pytest.mark.parametrize("path", ["dict", "scan", "subsets"])
def test_structural_search_equals_brute_force_scoring(decay, path):
    """The subset search must give exactly the brute-force ranking (score desc, then catalog order)."""
    import numpy as np

    from grlm_ray.lib.eig import position_weights

    rng = np.random.default_rng(7)
    vocab = [f"w{i}" for i in range(25)]
    tids = [list(rng.choice(vocab, size=5, replace=False)) for _ in range(300)]
    idx = TidIndex([str(i) for i in range(300)], tids, decay=decay)
    idx.small_postings, idx.scan_postings = {"dict": (10**9, 10**9), "scan": (-1, 10**9), "subsets": (-1, -1)}[path]
    w = position_weights(5, decay)
    for _ in range(60):
        q = list(rng.choice(vocab + ["zz", "yy"], size=5, replace=True))
        brute = sorted(((-sum(w[j] for j, t in enumerate(q) if t in set(tid)), i) for i, tid in enumerate(tids)))
        brute = [(i, -s) for s, i in brute if s < 0][:15]
        items, scores = idx.structural(q, 15)
        assert [int(i) for i in items] == [i for i, _ in brute], q
        assert np.allclose(scores, [s for _, s in brute])


def test_a_long_unconstrained_generation_ranks_exactly_without_enumerating_subsets():
    """An unconstrained beam that never wrote its end marker has up to max_new_tokens terms: 30 matched
    positions must not become 2^30 subsets (it ran out of memory on Beauty); the ranking stays exact."""
    import numpy as np

    from grlm_ray.lib.eig import position_weights

    rng = np.random.default_rng(3)
    vocab = [f"w{i}" for i in range(40)]
    tids = [list(rng.choice(vocab, size=5, replace=False)) for _ in range(400)]
    idx = TidIndex([str(i) for i in range(400)], tids)
    idx.small_postings = idx.scan_postings = -1  # the path that used to enumerate subsets
    q = list(rng.choice(vocab, size=30, replace=True))
    w = position_weights(32)
    brute = sorted(((-sum(w[j] for j, t in enumerate(q) if t in set(tid)), i) for i, tid in enumerate(tids)))
    brute = [(i, -s) for s, i in brute if s < 0][:10]
    items, scores = idx.structural(q, 10)
    assert [int(i) for i in items] == [i for i, _ in brute]
    assert np.allclose(scores, [s for _, s in brute])


def test_arrow_ranking_sums_match_score_rankings_on_random_rows():
    """``RankingSums`` (Arrow columns, added a slice at a time) against ``score_rankings`` (row dicts): same
    metrics per domain and overall, with and without valid flags; short, empty and duplicate-hit lists."""
    import random

    import pyarrow as pa

    from grlm_ray.lib.metrics import RankingSums

    rng = random.Random(11)
    for trial in range(25):
        rows = []
        for _ in range(rng.randint(1, 60)):
            ranked = rng.sample([f"i{j}" for j in range(12)], rng.randint(0, 8))
            if ranked and rng.random() < 0.1:
                ranked.append(ranked[0])  # a repeated item: the first place counts
            rows.append({"domain": rng.choice(["a", "b", "c"]), "target_item_id": f"i{rng.randint(0, 12)}",
                         "ranked_item_ids": ranked, "grounded_by": [rng.choice(["direct", "eig", "fill"]) for _ in ranked],
                         "beam_valid": [rng.random() < 0.7 for _ in range(rng.randint(0, 8))]})
        ks = (1, 3, 5)
        for with_valid in (True, False):
            want = score_rankings([r if with_valid else {k: v for k, v in r.items() if k != "beam_valid"} for r in rows], ks)
            sums = RankingSums(ks, with_valid)
            cut = rng.randint(0, len(rows))
            for part in (rows[:cut], rows[cut:]):
                col = lambda k, t: pa.array([r[k] for r in part], t)  # noqa: E731
                sums.add(col("domain", pa.string()), col("target_item_id", pa.string()),
                         col("ranked_item_ids", pa.list_(pa.string())), col("grounded_by", pa.list_(pa.string())),
                         col("beam_valid", pa.list_(pa.bool_())) if with_valid else None)
            got = sums.result()
            assert got.keys() == want.keys() and got["per_domain"].keys() == want["per_domain"].keys()
            for scope_got, scope_want in [(got["overall"], want["overall"])] + [
                    (got["per_domain"][d], want["per_domain"][d]) for d in want["per_domain"]]:
                assert scope_got.keys() == scope_want.keys()
                assert all(abs(scope_got[m] - scope_want[m]) <= 2e-6 for m in scope_want), (scope_got, scope_want)


def test_predictions_are_written_in_query_order_with_the_row_dict_metrics(tmp_path):
    """The evaluation's answers arrive in any order as Arrow strings; ``write_predictions`` writes them in
    query order a slice at a time and scores them: the same file and metrics as the row dicts it replaced."""
    import random

    import numpy as np
    import pyarrow as pa

    from grlm_ray.core.storage import StageContext, Store
    from grlm_ray.stages.evaluate import ANSWERS, write_predictions

    rng = random.Random(2)
    n = 230
    queries = pa.table({"row": pa.array(np.arange(n)), "user_id": [f"u{j}" for j in range(n)],
                        "split": ["test"] * n, "domain": [rng.choice(["a", "b"]) for _ in range(n)],
                        "target_item_id": [f"i{rng.randint(0, 30)}" for _ in range(n)]})
    answers = []
    for j in range(n):
        ranked = rng.sample([f"i{x}" for x in range(30)], rng.randint(1, 6))
        beams = rng.randint(0, 5)
        answers.append({"row": j, "ranked": "\t".join(ranked),
                        "how": "\t".join(rng.choice(["direct", "eig", "fill"]) for _ in ranked),
                        "candidates": "\t".join(f"w{rng.randint(0, 9)} v" for _ in range(beams)),
                        "valid": "\t".join(rng.choice("01") for _ in range(beams))})
    schema = pa.schema([("row", pa.int64())] + [(k, pa.string()) for k in ANSWERS])

    def batches(order):
        return [pa.RecordBatch.from_pylist([answers[j] for j in order[s:s + 17]], schema=schema) for s in range(0, n, 17)]

    popular = [f"i{x}" for x in range(25)]
    ctx = StageContext(Store(str(tmp_path)), "r", "eval")
    by_window = [j for w in range(0, n, 40) for j in rng.sample(range(w, min(n, w + 40)), min(n, w + 40) - w)]
    anywhere = rng.sample(range(n), n)
    rows, pop_rows = [], []
    for q, r in zip(queries.to_pylist(), answers):
        rows.append({"user_id": q["user_id"], "split": q["split"], "domain": q["domain"],
                     "target_item_id": q["target_item_id"], "candidates": r["candidates"].split("\t"),
                     "ranked_item_ids": r["ranked"].split("\t"), "grounded_by": r["how"].split("\t"),
                     "beam_valid": [x == "1" for x in r["valid"].split("\t")]})
        pop_rows.append({"domain": q["domain"], "target_item_id": q["target_item_id"],
                         "ranked_item_ids": popular[:10], "grounded_by": []})
    for order in (by_window, anywhere):  # window-major (one window held) or any order (held until complete)
        model, pop = write_predictions(ctx, queries, batches(order), popular, (1, 5, 10), window=40)
        written = Store(str(tmp_path)).read_table("r/eval/predictions.parquet").to_pylist()
        assert written == [{k: v for k, v in r.items() if k != "beam_valid"} for r in rows]
        for got, want in ((model, score_rankings(rows, (1, 5, 10))), (pop, score_rankings(pop_rows, (1, 5, 10)))):
            assert got["per_domain"].keys() == want["per_domain"].keys()
            for g, w in [(got["overall"], want["overall"])] + [(got["per_domain"][d], want["per_domain"][d]) for d in want["per_domain"]]:
                assert g.keys() == w.keys() and all(abs(g[m] - w[m]) <= 2e-6 for m in w)
    parts = batches(by_window)
    with pytest.raises(Exception, match=r"users from row 0: 229 answers for 230 users"):
        write_predictions(ctx, queries, [parts[0].slice(1)] + parts[1:], popular, (1, 5, 10))
    with pytest.raises(Exception, match=r"users 0\.\.39: 40 answers for 40 users"):  # one twice, one missing
        twice = pa.RecordBatch.from_pylist([answers[by_window[1]]] + [answers[j] for j in by_window[1:17]], schema=schema)
        write_predictions(ctx, queries, [twice] + parts[1:], popular, (1, 5, 10), window=40)
    from grlm_ray.stages.evaluate import length_order

    lengths = np.array([rng.randint(1, 9) for _ in range(n)])
    order = length_order(lengths, window=40)
    assert sorted(order.tolist()) == list(range(n))
    for w in range(0, n, 40):  # each window's rows, by length then row, windows in order
        assert order[w:w + 40].tolist() == sorted(range(w, min(n, w + 40)), key=lambda j: (lengths[j], j))


def test_merge_beams_places_added_tids_by_log_probability_plus_bonus_and_keeps_the_main_order():
    from grlm_ray.lib.eig import merge_beams

    main = [("a", -1.0), ("b", -3.0), ("c", -2.5), ("d", -6.0)]  # beam order (mean log-prob), not the sums
    extra = [("x", -4.0), ("y", -9.0), ("b", -0.5)]  # "b" already a main beam: not repeated
    assert merge_beams(main, extra, -float("inf")) == ["a", "b", "c", "d"]
    assert merge_beams(main, extra, 0.0) == ["a", "b", "c", "x", "d", "y"]
    assert merge_beams(main, extra, 2.0) == ["a", "x", "b", "c", "d", "y"]  # x at -2.0: before the first main below it
    assert merge_beams(main, extra, 10.0) == ["x", "y", "a", "b", "c", "d"]
    assert merge_beams([], extra, 0.0) == ["b", "x", "y"]


def test_added_search_needs_added_items_and_a_constrained_search():
    from grlm_ray.core.config import load_config

    with pytest.raises(Exception, match="added_beams"):
        load_config("configs/demo.yaml", ["eval.added_beams=5"])
    cfg = load_config("configs/demo.yaml", ["eval.added_beams=5", "eval.added_items=true"])
    assert cfg.eval.added_beams == 5
    assert load_config("configs/demo.yaml").section_hash("eval") == \
        load_config("configs/demo.yaml", ["eval.added_beams=0", "eval.added_bonus=0.0"]).section_hash("eval")


def test_joint_rankings_count_each_users_share_of_items_from_another_domain():
    """Namespaced ids (a joint catalog): a beam grounded to another domain's item is counted, per domain and
    overall, over the first k ranked items; not reported for single-domain ids."""
    import pyarrow as pa

    from grlm_ray.lib.metrics import RankingSums

    dom = pa.array(["beauty", "beauty", "toys"])
    target = pa.array(["beauty/1", "beauty/9", "toys/3"])
    ranked = pa.array([["beauty/1", "toys/2", "sports/5", "beauty/4"], ["beauty/2"], ["toys/3", "beauty/1"]],
                      pa.list_(pa.string()))
    how = pa.array([["direct"] * 4, ["direct"], ["direct"] * 2], pa.list_(pa.string()))
    sums = RankingSums((2, 4), with_valid=False, namespaced=True)
    sums.add(dom, target, ranked, how)
    got = sums.result()
    beauty, toys = got["per_domain"]["beauty"], got["per_domain"]["toys"]
    assert beauty["cross_domain_at_2"] == (0.5 + 0.0) / 2 and beauty["cross_domain_at_4"] == (0.5 + 0.0) / 2
    assert toys["cross_domain_at_2"] == 0.5 and abs(got["overall"]["cross_domain_at_2"] - 1 / 3) < 1e-6
    assert beauty["recall_at_2"] == 0.5 and toys["recall_at_2"] == 1.0  # the metrics themselves are unchanged
    plain = RankingSums((2,), with_valid=False)
    plain.add(dom, target, ranked, how)
    assert "cross_domain_at_2" not in plain.result()["overall"]


def test_the_eval_summary_shows_each_domain_of_a_joint_catalog():
    from grlm_ray.lib.metrics import format_metrics

    row = {"recall_at_5": 0.1, "ndcg_at_5": 0.05, "recall_at_10": 0.2, "ndcg_at_10": 0.07, "vr_at_10": 1.0,
           "dhr_at_10": 1.0, "users": 30}
    info = {"metrics": row, "popularity": {"recall_at_10": 0.01, "users": 30}, "protocol": {"split": "test"},
            "per_domain": {"beauty": {**row, "cross_domain_at_10": 0.125, "users": 20}, "toys": {**row, "users": 10}}}
    lines = format_metrics(info)
    assert any("other@10" in ln for ln in lines)
    (beauty,) = [ln for ln in lines if ln.split()[0] == "beauty"]
    assert beauty.split()[-2:] == ["0.125", "20"]
    (toys,) = [ln for ln in lines if ln.split()[0] == "toys"]
    assert toys.split()[-2:] == ["-", "10"]
    single = format_metrics({**info, "per_domain": {"beauty": row}})
    assert not any("other@10" in ln for ln in single)


def test_content_fill_gives_the_shown_lists_last_places_to_other_items_and_loses_none():
    from grlm_ray.lib.eig import fill_content

    ranked = list("abcdefghij") + ["k", "l"]
    # the model's first 8 keep their places; the fill skips what they hold; the pushed-out i, j follow
    assert fill_content(ranked, ["x", "a", "y", "z"], 2) == list("abcdefgh") + ["x", "y", "i", "j"]
    # a content item the model had below the head moves up and is not repeated
    assert fill_content(ranked, ["j", "x"], 2) == list("abcdefgh") + ["j", "x", "i", "k"]
    assert fill_content(ranked, ["x"], 0) == ranked
    assert fill_content(list("abcdef"), list("uvwxyz"), 3, depth=5) == ["a", "b", "u", "v", "w", "c"]
    assert fill_content(list("abc"), [], 2) == list("abc")  # nothing to fill with: as it was
    with pytest.raises(ValueError, match="content_fill"):
        from grlm_ray.core.config import EvalConfig

        EvalConfig(content_fill=11, content_depth=10)


def test_text_neighbours_rank_like_a_full_stable_sort_with_ties_in_catalog_order():
    import numpy as np

    from grlm_ray.lib.eig import TextNeighbours

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(400, 8)).astype(np.float32)
    emb[[5, 9, 30]] = emb[7]  # identical texts: tied scores
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = [f"i{k}" for k in range(400)]
    near = TextNeighbours(ids, emb, ids)
    anchors = [ids[k] for k in rng.integers(0, 400, 300)] + [ids[7], None, "unknown"]
    got = near.ranked(anchors, 10)
    assert got[-2:] == [[], []]  # no anchor, or one without an embedding: nothing
    rows = np.array([near.at[a] for a in anchors[:-2]])
    sc = emb[rows] @ emb.T  # the same product, every item sorted
    sc[np.arange(len(rows)), rows] = -np.inf
    assert got[:-2] == [[ids[j] for j in np.argsort(-s, kind="stable")[:10]] for s in sc]
    assert set(got[-3][:3]) == {"i5", "i9", "i30"}  # the anchor's twins first, itself excluded
    sub = TextNeighbours(ids, emb, ids[:50])  # a pool: only its items
    assert all(set(r) <= set(ids[:50]) for r in sub.ranked(anchors[:20], 5))
