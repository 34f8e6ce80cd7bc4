"""Semantic compression: the core-term mapping on hand-built vectors, and a real sweep on Beauty."""

import numpy as np
import pytest

from grlm_ray.stages.compress import apply_map, core_term_map


def test_core_terms_merge_near_synonyms_and_keep_tids_distinct():
    vocab = ["cleanser", "cleansing", "wash", "lipstick", "lip-color", "mascara"]
    e = np.array([[1, 0, 0], [0.99, 0.1, 0], [0.97, 0.2, 0], [0, 1, 0], [0.1, 0.99, 0], [0, 0, 1]], np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    m = core_term_map(vocab, e, 3, seed=0)
    assert len(set(m.values())) == 3
    assert m["cleanser"] == m["cleansing"] == m["wash"] and m["lipstick"] == m["lip-color"] != m["mascara"]
    core = m["cleanser"]
    # two terms of one TID mapping to the same core: the second keeps its own word
    assert apply_map([["cleanser", "wash", "mascara"]], m) == [[core, "wash" if core != "wash" else "cleanser", "mascara"]]
    assert core_term_map(vocab, e, 10) == {t: t for t in vocab}


def test_random_grouping_keeps_the_cluster_sizes_and_drops_the_meaning():
    """``compress.grouping=random``: the control for the merged words' meaning — the semantic clusters' sizes, members
    shuffled (seeded: the same map twice)."""
    from collections import Counter

    vocab = [f"w{i}" for i in range(40)]
    rng = np.random.default_rng(1)
    centres = np.eye(8)[:4]  # four orthogonal meanings, ten near-synonyms each
    e = np.repeat(centres, 10, axis=0) + 0.01 * rng.normal(size=(40, 8))
    e = (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)
    sem = core_term_map(vocab, e, 4, seed=0)
    rnd = core_term_map(vocab, e, 4, seed=0, grouping="random")
    assert sorted(Counter(sem.values()).values()) == sorted(Counter(rnd.values()).values()) == [10, 10, 10, 10]
    # semantic: the ten terms around each centre share a core; random: no cluster is one centre's ten
    assert all(len({sem[v] for v in vocab[i:i + 10]}) == 1 for i in range(0, 40, 10))
    assert all(len({rnd[v] for v in vocab[i:i + 10]}) > 1 for i in range(0, 40, 10))
    assert rnd == core_term_map(vocab, e, 4, seed=0, grouping="random")
    with pytest.raises(ValueError, match="grouping"):
        core_term_map(vocab, e, 4, grouping="alphabetic")


def test_behaviour_grouping_merges_the_terms_of_items_bought_together():
    """``compress.grouping=behaviour``: item vectors from the training sequences alone (held-out positions are not in
    ``lists``), each term the sum of its items' vectors, k-means over those — terms of items bought in the same
    sessions merge whatever the words mean; a term whose items were never trained on is counted, not dropped."""
    import pyarrow as pa

    from grlm_ray.stages.compress import behaviour_vectors, item_behaviour

    rng = np.random.default_rng(0)
    shops = [[f"a{i}" for i in range(5)], [f"b{i}" for i in range(5)]]
    seqs = [list(rng.permutation(shops[u % 2])) for u in range(40)]  # each user buys within one shop
    ids = shops[0] + shops[1] + ["new"]  # "new": in the catalog, never in a training sequence
    lists = pa.array(seqs, pa.list_(pa.string()))
    iv = item_behaviour(lists, ids, dim=2)  # two shops: two dimensions say everything
    assert iv.shape == (11, 2) and not iv[-1].any() and np.allclose(np.linalg.norm(iv[:-1], axis=1), 1)
    same = float(np.mean([iv[0] @ iv[j] for j in range(1, 5)]))
    other = float(np.mean([iv[0] @ iv[j] for j in range(5, 10)]))
    assert same > 0.9 and other < 0.1
    # words that mean nothing about the shops: every item has a colour term (shared across shops) and its own term
    tids = [[f"own{i}", ["red", "blue"][i % 2]] for i in range(10)] + [["lonely", "red"]]
    vocab = sorted({t for tid in tids for t in tid})
    vecs, empty = behaviour_vectors(vocab, tids, iv, seed=0)
    assert empty == 1 and np.allclose(np.linalg.norm(vecs, axis=1), 1)  # "lonely": only the untrained item has it
    m = core_term_map(vocab, vecs, 3, seed=0, grouping="behaviour")
    assert len({m[f"own{i}"] for i in range(5)}) == 1 and len({m[f"own{i}"] for i in range(5, 10)}) == 1
    assert m["own0"] != m["own5"]
    assert not item_behaviour(pa.array([[]], pa.list_(pa.string())), ids, dim=2).any()  # no training: zero rows


def test_behaviour_text_places_rarely_bought_items_by_their_text():
    """``compress.behaviour_text=c``: an item's text embedding joins its behaviour vector, weighted c / (c + n) for n
    training interactions — a never-bought item is its text alone, an often-bought one nearly its behaviour."""
    from grlm_ray.stages.compress import with_text

    beh = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]], np.float32)  # the third item was never bought
    text = np.array([[0.0, 3.0], [0.0, 3.0], [0.0, 3.0]], np.float32)  # not normalized: with_text does it
    out = with_text(beh, text, np.array([95, 5, 0]), 5.0)
    assert np.allclose(np.linalg.norm(out, axis=1), 1)
    assert np.allclose(out[0], np.array([0.95, 0, 0, 0.05]) / np.hypot(0.95, 0.05))
    assert np.allclose(out[1], np.array([1, 0, 0, 1]) / np.sqrt(2))  # n = c: half and half
    assert np.allclose(out[2], [0, 0, 0, 1])


def test_a_tid_keeps_distinct_terms_and_ranks_give_the_next_core():
    """A core that another term of the TID is itself, or that an earlier term took: the term keeps its own word (no
    TID ever holds a term twice); with ranks (behaviour grouping) it takes its next free core instead, so the
    vocabulary stays at the K cores — its own word only when every ranked core is taken."""
    m = {"cream": "lotion", "balm": "lotion", "lotion": "lotion", "face": "face", "hand": "face"}
    assert apply_map([["cream", "lotion"]], m) == [["cream", "lotion"]]  # was ["lotion", "lotion"]
    assert apply_map([["cream", "balm", "hand"]], m) == [["lotion", "balm", "face"]]
    ranks = {"cream": ["lotion", "face"], "balm": ["lotion", "face", "hand"], "hand": ["face", "lotion"]}
    assert apply_map([["cream", "balm"]], m, ranks=ranks) == [["lotion", "face"]]
    assert apply_map([["cream", "lotion"]], m, ranks=ranks) == [["face", "lotion"]]
    assert apply_map([["cream", "balm", "hand"]], m, ranks=ranks) == [["lotion", "face", "hand"]]  # all taken: own
    assert apply_map([["cream", "face"]], m, keep_lead=True, ranks=ranks) == [["cream", "face"]]


def test_keep_lead_maps_only_the_terms_after_the_first():
    """``compress.keep_lead``: the lead term (a brand) stays as written, only later terms are clustered and mapped;
    the sweep reports the distinct lead terms, which compression without it merges."""
    import pyarrow as pa

    from grlm_ray.core.schemas import TERMS
    from grlm_ray.stages.compress import sweep

    m = {"acme": "core", "zenith": "core", "cream": "lotion", "lotion": "lotion"}
    assert apply_map([["acme", "cream"]], m, keep_lead=True) == [["acme", "lotion"]]
    assert apply_map([["acme", "cream"]], m) == [["core", "lotion"]]
    tids = [["acme", "cream", "face"], ["zenith", "lotion", "face"], ["acme", "lotion", "hand"]]
    ids = ["1", "2", "3"]
    terms = pa.table({"item_id": ids, "terms": tids, "raw": [""] * 3, "valid": [True] * 3, "source": ["x"] * 3},
                     schema=TERMS.arrow)
    items = pa.table({"item_id": ids, "category": ["c"] * 3, "title": ["rich", "light", "dry"], "description": [""] * 3,
                      "brand": [""] * 3, "categories": pa.array([[]] * 3, pa.list_(pa.string()))})
    vecs = {"acme": [1, 0, 0], "zenith": [1, 0.01, 0], "cream": [0, 1, 0], "lotion": [0, 1, 0.01],
            "face": [0, 0, 1], "hand": [0.01, 0, 1]}
    seen = []

    def encode(vocab):
        seen.append(list(vocab))
        e = np.array([vecs[v] for v in vocab], np.float32)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    rows, tables = sweep(terms, items, [2], encode, keep_lead=True)
    assert seen == [["cream", "face", "hand", "lotion"]]  # the leads are not clustered
    assert [t[0] for t in tables[2].column("terms").to_pylist()] == ["acme", "zenith", "acme"]
    assert rows[0]["distinct_lead_terms"] == rows[1]["distinct_lead_terms"] == 2
    rows, tables = sweep(terms, items, [3], encode)  # without it the two brands merge into one core
    assert rows[0]["distinct_lead_terms"] == 2 and rows[1]["distinct_lead_terms"] == 1
    # keep_rare=1: the one-item terms (zenith, cream, hand) stay as written, only the shared ones are clustered
    seen.clear()
    rows, tables = sweep(terms, items, [1], encode, keep_rare=1)
    assert seen == [["acme", "face", "lotion"]]
    mapped = tables[1].column("terms").to_pylist()
    assert [t for t in mapped[1] if t in ("zenith", "hand", "cream")] == ["zenith"] and "cream" in mapped[0]
    assert "hand" in mapped[2]
    assert rows[1]["core_terms"] == 1 and rows[1]["colliding_items_after"] == 0
    seen.clear()
    rows, tables = sweep(terms, items, [1], encode, keep_rare=2)  # every term used by <= 2 items: none clustered
    assert seen == [] and tables[1].column("terms").to_pylist() == tids and rows[1]["vocab"] == rows[0]["vocab"]


@pytest.mark.slow
def test_sweep_on_authors_beauty_tids_with_real_encoder(shared_data, tmp_path):
    from grlm_ray.core.config import load_config
    from grlm_ray.flows.pipeline import run_pipeline
    from grlm_ray.core.storage import Store

    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=b", f"data.base_dir={shared_data}",
                             "data.domains={beauty: {kind: bundle, dir: beauty}}", "compress.source=provided",
                             "compress.ks=[1000, 3000]"])
    res = run_pipeline(cfg, stages=("prepare", "compress"))
    rows = res["stages"]["compress"]["info"]["sweep"]
    raw, k1000, k3000 = rows
    print("\n" + "\n".join(str(r) for r in rows))
    assert k1000["core_terms"] == 1000 and k3000["core_terms"] == 3000
    assert k1000["vocab"] < k3000["vocab"] < raw["vocab"]
    assert k1000["colliding_items_mapped"] >= k3000["colliding_items_mapped"] >= raw["colliding_items_mapped"]
    assert all(r["colliding_items_after"] == 0 for r in rows[1:])
    assert Store(str(tmp_path)).read_table("b/compress/k1000/terms.parquet").num_rows == 12100
    import mlflow

    from grlm_ray.core.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(cfg))
    runs = mlflow.search_runs(experiment_names=["grlm-beauty"], filter_string="tags.`grlm.stage` = 'compress'")
    assert {"1000", "3000", "raw"} <= set(runs["tags.grlm.compress_k"].dropna())
    # behaviour grouping on the same prepared data: the stage reads the training sequences (recorded as its inputs)
    beh = load_config(None, [f"run.root={tmp_path}", "run.name=b", f"data.base_dir={shared_data}",
                             "data.domains={beauty: {kind: bundle, dir: beauty}}", "compress.source=provided",
                             "compress.ks=[1000]", "compress.grouping=behaviour", "tracking.enabled=false"])
    info = run_pipeline(beh, stages=("prepare", "compress"))["stages"]["compress"]["info"]
    print(info["sweep"], info["items_without_training"], info["terms_without_training"])
    b1000 = info["sweep"][1]
    assert b1000["core_terms"] == 1000 and b1000["colliding_items_after"] == 0 and b1000["vocab"] < raw["vocab"]
    assert 0 <= info["items_without_training"] < 200 and 0 <= info["terms_without_training"] < 200
    from grlm_ray.core.storage import read_manifest

    assert {"sequences", "targets"} <= set(read_manifest(Store(str(tmp_path)), "b", "compress")["inputs"])


def test_variant_names_say_what_was_compressed_and_how():
    """A comparison's K variants are named by every compress switch that changes their terms, so a lead-keeping or a
    random-grouping variant never reuses (or overwrites) the plain K variant's run; at the defaults the keys are the
    ones recorded before the switches existed."""
    from grlm_ray.core.config import load_config
    from grlm_ray.core.registry import stage_key
    from grlm_ray.flows.compare import variant_config, variant_name

    base = load_config("configs/demo.yaml", ["compress.ks=[60]"])
    assert variant_name(base, None) == "raw" and variant_name(base, 60) == "k60"
    lead = load_config("configs/demo.yaml", ["compress.ks=[60]", "compress.keep_lead=true"])
    rnd = load_config("configs/demo.yaml", ["compress.ks=[60]", "compress.grouping=random"])
    assert variant_name(lead, 60) == "k60-lead" and variant_name(rnd, 60) == "k60-random"
    rare = load_config("configs/demo.yaml", ["compress.ks=[60]", "compress.keep_rare=1"])
    assert variant_name(rare, 60) == "k60-rare1" and stage_key(rare, "compress") != stage_key(base, "compress")
    assert stage_key(load_config("configs/demo.yaml", ["compress.ks=[60]", "compress.keep_rare=0"]),
                     "compress") == stage_key(base, "compress")
    assert variant_config(rnd, 60).run.name == f"{base.run.name}-k60-random"
    explicit = load_config("configs/demo.yaml", ["compress.ks=[60]", "compress.grouping=semantic"])
    assert stage_key(explicit, "compress") == stage_key(base, "compress") != stage_key(rnd, "compress")
    beh = load_config("configs/demo.yaml", ["compress.ks=[60]", "compress.grouping=behaviour"])
    text = load_config("configs/demo.yaml", ["compress.ks=[60]", "compress.grouping=behaviour",
                                             "compress.behaviour_text=5"])
    assert variant_name(text, 60) == "k60-behaviour-text5" and stage_key(text, "compress") != stage_key(beh, "compress")
    with pytest.raises(Exception, match="needs compress.grouping=behaviour"):
        load_config("configs/demo.yaml", ["compress.behaviour_text=5"])
    assert variant_name(beh, 60) == "k60-behaviour" and stage_key(beh, "compress") not in (
        stage_key(base, "compress"), stage_key(rnd, "compress"))


def test_the_stage_groups_by_behaviour_with_text_from_its_own_artifacts(tmp_path):
    """The compress stage with ``grouping=behaviour`` and ``behaviour_text``: it reads the prepared sequences (the held-out
    positions not learned from: "new" is only ever a test target), targets and the embed stage's embeddings, records
    them as its inputs, counts the items never trained on, and an item without an embedding stops it with an error
    naming the item."""
    import pyarrow as pa

    from grlm_ray.core.config import load_config
    from grlm_ray.core.schemas import EMBEDDINGS, ITEMS, SEQUENCES, TARGETS, TERMS
    from grlm_ray.core.storage import Store, read_manifest
    from grlm_ray.stages.compress import compress

    ids = [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)] + ["new"]
    store = Store(str(tmp_path))
    store.write_table("c/prepare/items.parquet", pa.table(
        {"item_id": ids, "category": ["c"] * 11, "title": [f"{i} plain{k} sturdy{k} cotton{k}" for k, i in enumerate(ids)],
         "description": [""] * 11, "brand": [""] * 11,
         "categories": pa.array([[]] * 11, pa.list_(pa.string()))}), ITEMS)
    tids = [[f"own{i}", ["red", "blue"][i % 2]] for i in range(10)] + [["lonely", "red"]]
    store.write_table("c/ctg/terms.parquet", pa.table(
        {"item_id": ids, "terms": tids, "raw": [""] * 11, "valid": [True] * 11, "source": ["lexical"] * 11},
        schema=TERMS.arrow), TERMS)
    rng = np.random.default_rng(0)
    seqs = [list(rng.permutation(ids[:5] if u % 2 else ids[5:10])) + ["new"] for u in range(40)]  # "new": held out
    users = [f"u{u}" for u in range(40)]
    store.write_table("c/prepare/sequences.parquet", pa.table(
        {"user_id": users, "item_ids": seqs, "timestamps": pa.array([None] * 40, pa.list_(pa.int64()))}), SEQUENCES)
    store.write_table("c/prepare/targets.parquet", pa.table(
        {"user_id": users, "split": ["test"] * 40, "domain": ["d"] * 40, "position": pa.array([5] * 40, pa.int32()),
         "target_item_id": ["new"] * 40}), TARGETS)
    text = rng.normal(size=(11, 8)).astype(np.float32)  # every item has text, "new" too: no term without a vector
    store.write_table("c/embed/embeddings.parquet", pa.table(
        {"item_id": ids, "embedding": pa.array(list(text), pa.list_(pa.float32()))}), EMBEDDINGS)
    over = [f"run.root={tmp_path}", "run.name=c", "compress.ks=[3]", "compress.grouping=behaviour",
            "compress.behaviour_text=1", "tracking.enabled=false"]
    res = compress(load_config(None, over))
    assert res["info"]["items_without_training"] == 1 and res["info"]["terms_without_training"] == 0
    assert {"sequences", "targets", "embeddings"} <= set(read_manifest(store, "c", "compress")["inputs"])
    raw, k3 = res["info"]["sweep"]  # (which terms merge is the unit tests' business: here the stage's wiring)
    assert k3["core_terms"] == 3 and k3["vocab"] < raw["vocab"] and k3["colliding_items_after"] == 0
    assert store.read_table("c/compress/k3/terms.parquet").num_rows == 11
    store.write_table("c/embed/embeddings.parquet", pa.table(
        {"item_id": ids[:-1], "embedding": pa.array(list(text[:-1]), pa.list_(pa.float32()))}), EMBEDDINGS)
    with pytest.raises(ValueError, match="1 items have no embedding.*'new'"):
        compress(load_config(None, over + ["compress.seed=1"]))
