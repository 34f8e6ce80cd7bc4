"""CTG prompt, parsing, normalization and repair on hand-written LLM outputs (no model needed)."""

from grlm_ray.core.config import CTGConfig
from hypothesis import given, settings
from hypothesis import strategies as st

from grlm_ray.lib.termgen import (answer_settled, build_messages, example_tids, judge, normalize_term, own_words,
                                  parse_terms, repair, tid_stats)

ITEM = {"item_id": "1", "title": "Tea Tree Special Shampoo", "description": "Invigorating cleanser. " * 100,
        "brand": "Paul Mitchell", "categories": ["Beauty", "Hair Care"], "category": "beauty"}
NB = [{"item_id": "2", "title": "Tea Tree Conditioner", "description": "", "brand": "", "categories": [],
       "category": "beauty"}]


def test_prompt_has_neighbours_unless_ablated_and_is_bounded():
    cfg = CTGConfig(max_item_chars=200)
    msgs = build_messages(ITEM, NB, cfg)
    user = msgs[-1]["content"]
    assert "Similar products" in user and "Tea Tree Conditioner" in user and "exactly 5 words" in user
    assert len(user) < 1200  # the 2,400-char description is cut
    ablated = build_messages(ITEM, NB, CTGConfig(context="none"))[-1]["content"]
    assert "Similar products" not in ablated and "same words as the similar" not in ablated
    assert "exactly 7 words" in build_messages(ITEM, NB, CTGConfig(num_terms=7))[-1]["content"]


def test_few_shot_examples_are_earlier_turns_with_the_answer_format():
    examples = [(NB[0], ["conditioner", "hair", "tea-tree", "women", "mint"])]
    plain = build_messages(ITEM, NB, CTGConfig())
    assert build_messages(ITEM, NB, CTGConfig(), examples) == plain  # few_shot=0: examples are not shown
    msgs = build_messages(ITEM, NB, CTGConfig(few_shot=2), examples)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert "exactly 5 words" in msgs[1]["content"] and "Tea Tree Conditioner" in msgs[1]["content"]
    assert msgs[2]["content"] == "Terms: conditioner, hair, tea-tree, women, mint"
    assert parse_terms(msgs[2]["content"], 5).valid  # the example answer is one the parser accepts
    assert msgs[3]["content"].startswith("Product: ") and "Similar products" in msgs[3]["content"]
    assert "exactly 5 words" not in msgs[3]["content"]  # the instructions are said once


def test_a_new_option_at_its_default_keeps_finished_stages_valid():
    from grlm_ray.core.config import load_config

    base = load_config(None, [])
    assert base.section_hash("ctg") == load_config(None, ["ctg.few_shot=0"]).section_hash("ctg")
    assert base.section_hash("ctg") != load_config(None, ["ctg.few_shot=2"]).section_hash("ctg")


def test_normalize_term():
    assert normalize_term("Shampoos") == "shampoo"
    assert normalize_term("Tea Tree") == "tea-tree"
    assert normalize_term("anti-aging") == "anti-aging"
    assert normalize_term("  **Women's** ") == "woman"
    assert normalize_term("the") == "" and normalize_term("123") == ""


def test_parse_valid_outputs_in_several_shapes():
    for text in [" shampoo, cleanse, tea-tree, adult, invigorating",
                 "Terms: Shampoo; Cleansing; Tea Tree; Adults; Invigorating\nExplanation: ...",
                 "1. shampoo 2. cleanse 3. tea tree 4. adult 5. invigorating",
                 "shampoo cleanse tea-tree adult invigorating"]:
        p = parse_terms(text, 5)
        assert p.valid, (text, p)
        assert p.terms[0] == "shampoo" and p.terms[3] == "adult"


def test_parse_rejects_wrong_counts_and_duplicates():
    assert parse_terms("shampoo, hair, hair, care", 5).reason == "3 usable terms, expected 5"
    assert not parse_terms("a, b, c, d, e, f, g", 5).valid
    p = parse_terms("shampoo, hair, care, soft, shine, extra", 5)
    assert not p.valid and p.reason == "6 terms, expected 5"
    assert not parse_terms("This product is a product of the company Paul Mitchell", 5).valid
    assert not parse_terms("", 5).valid


def test_repair_fills_from_own_text_then_context():
    out = repair(["shampoo"], ["Tea Tree Special Shampoo", "Invigorating cleanser"], "beauty", 5)
    assert out == ["shampoo", "tea", "tree", "special", "invigorate"]
    assert repair([], ["", ""], "beauty", 3) == ["beauty", "product", "item"]


def test_tid_stats():
    s = tid_stats([["a", "b"], ["a", "b"], ["a", "c"]])
    assert s["unique_tids"] == 2 and s["colliding_items"] == 2 and s["per_position_vocab"] == [1, 2]


def test_parse_bullets_and_placeholder_echoes():
    p = parse_terms("\n- Shampoo\n- Cleansing\n- Tea Tree\n- Adults\n- Invigorating\n", 5)
    assert p.valid and p.terms == ["shampoo", "cleanse", "tea-tree", "adult", "invigorate"]
    echo = parse_terms("<category or type>, <function>, <distinctive feature>, <audience>, <selling point>", 5)
    assert not echo.valid and echo.terms == []
    # a whole title as one bullet is junk (more than 3 words), not a term
    assert not parse_terms("\n- Dove Damage Therapy Intensive Repair Conditioner\n- Dove", 5).valid


def test_repair_drops_ungrounded_fragments():
    out = repair(["fluid-oun", "conditioner", "dove"], ["Dove Damage Therapy Conditioner 8 Fl Oz"], "beauty", 4)
    assert out == ["conditioner", "dove", "damage", "therapy"]


def test_a_tokenizer_without_a_chat_template_gets_a_plain_transcript(caplog):
    import logging
    from types import SimpleNamespace

    from grlm_ray.lib.generation import render

    tok = SimpleNamespace(chat_template=None, bos_token="<bos>")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Product: soap"},
            {"role": "assistant", "content": "Terms: soap, bar, olive, women, gentle"}, {"role": "user", "content": "Product: gel"}]
    text = render(tok, msgs, "Terms:", enable_thinking=False)
    assert text.startswith("<bos>System: Be brief.\n\nUser: Product: soap\n\nAssistant: Terms: soap")
    assert text.endswith("User: Product: gel\n\nAssistant: Terms:")
    tok.name_or_path = "plain-base-model"
    with caplog.at_level(logging.INFO, logger="grlm_ray.lib.generation"):
        for _ in range(3):
            render(tok, msgs, "Terms:", enable_thinking=False)
    assert sum("plain-base-model has no chat template" in r.getMessage() for r in caplog.records) == 1  # once


# answers as the small CTG LLMs write them (from SmolLM2 / Gemma runs): one line, lists, rambling, echoes
ANSWERS = [" shampoo, cleanse, tea-tree, adult, invigorating", " Terms: Shampoo; Cleansing; Tea Tree; Adults\nMore: x",
           " liquid, fake, bake, face, body, bronzing, 6-Ounce, fair, 6-Ounce, bronzing,",
           " \n- One N' Only Argan Oil Treatment \n- One N' Only Argan Oil Treatment \n- Argan",
           " 1. Philosophy Microdelivery Exfoliating Wash, 16-Ounce\nFunction: Exfoliant\nDistinctive Feature: Ex",
           " Now Foods Egyptian, 1-Ounce\nFunction: Essential oil\nSelling point: 1-",
           " shampoo hair gentle tea tree", " a, b, c, d, e, f, g", " \n\nterms: mask, hair, repair, argan, oil\n",
           " - shampoo\n- cleanse\n- tea tree\n- adult\n- invigorate\n- extra\n- more\n- most"]


def _assert_stopping_never_changes_the_parse(text: str, n: int) -> None:
    """Where decoding stops, the verdict is final: a valid answer is the whole answer; an answer with too many
    terms is already invalid and keeps its leading terms (the ones a repair reads first)."""
    full = parse_terms(text, n)
    for cut in range(len(text) + 1):
        if answer_settled(text[:cut], n):
            early = parse_terms(text[:cut], n)
            assert early.valid == full.valid and full.terms[:len(early.terms)] == early.terms, (text, cut)
            assert early == full or len(early.terms) > n, (text, cut)
            return


def test_decoding_stops_only_where_the_rest_of_the_answer_cannot_change_its_parse():
    for text in ANSWERS:
        for n in (3, 5):
            _assert_stopping_never_changes_the_parse(text, n)
    assert answer_settled(" shampoo, hair, care, soft, shine\n", 5)  # the line is complete
    assert answer_settled(" a1, b1, c1, d1, e1, f1, g", 5) is False  # junk pieces are not terms
    assert answer_settled(" shampoo, hair, care, soft, shine, extra, more", 5)  # 6 terms before the last comma
    assert not answer_settled(" shampoo, hair, care, soft, shine", 5)  # the 5th term may still grow
    assert not answer_settled(" Ter", 5) and not answer_settled(" \n- a\n- b\n", 5)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["shampoo", "hair", "Tea Tree", "care", "the", "6-Ounce", "Terms:", "-", "1.",
                                 ",", ", ", ";", "\n", " ", "- ", "oil", "mask", "x"]), max_size=30),
       st.integers(2, 6))
def test_stopping_never_changes_the_parse_of_generated_answers(parts, n):
    _assert_stopping_never_changes_the_parse("".join(parts), n)


def test_an_answer_that_repeats_a_worked_example_is_not_valid():
    """The small CPU LLMs answer an item they cannot describe with a neighbour's TID from the few-shot turns
    (a mascara's TID for a makeup mirror): valid in form, wrong for the item."""
    examples = [(NB[0], ["conditioner", "hair", "tea-tree", "women", "mint"])]
    msgs = build_messages(ITEM, NB, CTGConfig(few_shot=2), examples)
    shown = example_tids(msgs, 5)
    assert shown == [frozenset({"conditioner", "hair", "tea-tree", "woman", "mint"})]  # normalized as answers are
    copy = judge(" Mint, hair, conditioner, tea-tree, women", 5, shown)  # the example's terms, reordered
    assert not copy.valid and copy.reason == "repeats a worked example's TID"
    own = judge(" shampoo, hair, tea-tree, invigorating, mint", 5, shown)  # shares words: fine
    assert own.valid and own == parse_terms(" shampoo, hair, tea-tree, invigorating, mint", 5)
    assert judge(" conditioner, hair, tea-tree, women, mint", 5, []).valid  # no examples shown: nothing to repeat


def test_an_answer_with_no_word_of_the_item_is_not_valid():
    """A TID for a makeup mirror made of a neighbouring mascara's terms shares no word with the mirror's text."""
    own = own_words(["Lighted Travel Makeup Mirror, 10x Magnifying", "A new product added while serving."])
    stray = judge(" zenra, volumize, mascara, woman, hydrate", 5, [], own)
    assert not stray.valid and stray.reason == "no term is a word of the item's own text"
    assert judge(" mirror, makeup, lighted, travel, magnify", 5, [], own).valid
    assert judge(" beauty, vanity, light-up, compact, travel-size", 5, [], own).valid  # 'travel' of a compound
    assert judge(" zenra, volumize, mascara, woman, hydrate", 5).valid  # unchecked without the item's words


def test_one_dispatch_writes_new_items_tids_for_the_ctg_stage_and_serving():
    """``write_tids``: the rule methods from the job alone, the LLM method through the writer with exactly the
    request the CTG stage's actors get (``writer_request``); a stub writer here: the dispatch is tested, the
    real writer is in test_ctg_llm.py."""
    import json

    import numpy as np
    import pytest

    from grlm_ray.lib.termgen import TidJob, by_rules, words_tid, write_tids, writer_request

    ex = [(NB[0], ["conditioner", "hair", "tea-tree", "women", "mint"])]
    job = TidJob(ITEM, NB, ex, ["shampoo", "tea-tree", "paul", "special", "hair"])
    words = write_tids(CTGConfig(method="words"), [job])
    assert words[0]["terms"] == words_tid(ITEM, NB, 5) and words[0]["source"] == "words" and words[0]["valid"]
    lexical = write_tids(CTGConfig(method="lexical"), [job])
    assert lexical[0]["terms"] == list(job.lexical) and lexical[0]["source"] == "lexical"
    assert by_rules(CTGConfig(method="words")) and not by_rules(CTGConfig(method="llm"))

    cfg = CTGConfig(method="llm", few_shot=1)
    seen = {}

    def stub(batch, deadline=None):
        seen.update(batch=batch, deadline=deadline)
        return {"item_id": batch["item_id"], "terms": np.array(["shampoo\ttea-tree\tspecial\tcleanser\thair"], object),
                "raw": np.array(["Terms: ..."], object), "valid": np.array([True]), "source": np.array(["llm"], object),
                "attempts": np.array([2]), "reason": np.array(["ok"], object)}

    got = write_tids(cfg, [job], stub, deadline=12.5)
    want = writer_request(ITEM, NB, cfg, ex, job.lexical)
    assert {k: seen["batch"][k][0] for k in want} == want and seen["deadline"] == 12.5
    assert "Tea Tree Conditioner" in json.loads(want["messages"])[1]["content"]  # the worked example is shown
    assert got == [{"item_id": "1", "terms": ["shampoo", "tea-tree", "special", "cleanser", "hair"],
                    "raw": "Terms: ...", "valid": True, "source": "llm", "attempts": 2, "reason": "ok"}]
    with pytest.raises(ValueError, match="needs a TermWriter"):
        write_tids(cfg, [job])
    assert write_tids(cfg, []) == []
