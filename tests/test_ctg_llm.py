"""CTG with the real small LLM (SmolLM2-135M-Instruct from the PyPI wheel) on a handful of items."""

import re

import pytest

from grlm_ray.core.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]
CTG_STAGES = ("prepare", "embed", "neighbors", "ctg")


def test_ctg_real_llm_writes_valid_tids_and_resumes(tmp_path, ray_local, model_cache):
    from grlm_ray.flows.pipeline import run_pipeline
    from grlm_ray.core.storage import Store

    ov = [f"run.root={tmp_path}", "data.domains.demo.num_items=120", "data.domains.demo.num_users=300",
          "ray.progress_bars=false", "ctg.limit=6", "ctg.part_size=3", "ctg.retries=1", "ctg.llm.batch_size=6",
          "ctg.llm.max_new_tokens=24", f"ctg.llm.cache_dir={model_cache}"]
    res = run_pipeline(load_config(None, ov), stages=CTG_STAGES)
    info = res["stages"]["ctg"]["info"]
    store = Store(str(tmp_path))
    llm = store.read_table("demo/ctg/terms_llm.parquet").to_pylist()
    final = store.read_table("demo/ctg/terms.parquet").to_pylist()
    assert len(llm) == len(final) == 6
    for r in final:
        assert len(r["terms"]) == 5 and len(set(r["terms"])) == 5
        assert all(re.fullmatch(r"[a-z][a-z\-]*", t) for t in r["terms"]), r["terms"]
        assert r["source"].split("+")[0] == "llm"
    # the text really came from the model: something beyond the answer prefix, not all identical
    assert all(len(r["raw"]) > len("Terms:") + 3 for r in llm)
    assert len({r["raw"] for r in llm}) > 1
    assert 0.0 <= info["legality_rate"] <= 1.0 and info["repaired_items"] == sum(not r["valid"] for r in llm)
    assert info["after_resolution"]["colliding_items"] == 0
    assert info["prompt_version"] and "Similar products" in info["prompt_example"][-1]["content"]
    # same config again: every stage is skipped
    again = run_pipeline(load_config(None, ov), stages=CTG_STAGES)
    assert all(m["skipped"] for m in again["stages"].values())
    # an interrupted run (manifest still 'running', last part missing) resumes: only that part is redone
    import json
    import shutil

    man = tmp_path / "demo" / "ctg" / "_manifest.json"
    m = json.loads(man.read_text())
    man.write_text(json.dumps({**m, "status": "running"}))
    shutil.rmtree(tmp_path / "demo" / "ctg" / "parts" / "00001")
    resumed = run_pipeline(load_config(None, ov), stages=CTG_STAGES)["stages"]["ctg"]
    assert not resumed["skipped"] and resumed["info"]["generated_items_this_run"] == 3
    assert store.read_table("demo/ctg/terms.parquet").column("item_id").to_pylist() == [r["item_id"] for r in final]


def test_greedy_generation_is_deterministic(model_cache):
    from grlm_ray.core.config import LLMConfig
    from grlm_ray.lib.generation import TransformersGenerator, resolve_llm_path

    cfg = LLMConfig(cache_dir=str(model_cache), max_new_tokens=12, batch_size=2)
    gen = TransformersGenerator(resolve_llm_path(cfg), cfg, threads=2)
    conv = [[{"role": "user", "content": "Name three fruits."}], [{"role": "user", "content": "Say hello."}]]
    a = gen.generate(conv)
    b = gen.generate(conv[:1])
    assert a[0] == b[0] and a[0].strip() and a[0] != a[1]


def test_kept_prompt_prefill_and_early_stop_change_no_answer(model_cache):
    """A retry of the same prompt reuses its prefill (the KV cache of the prompt), and decoding stops once the
    answer is settled: the text a fresh generator writes for the same seed, and the same parse."""
    import functools

    from grlm_ray.core.config import LLMConfig
    from grlm_ray.lib.generation import TransformersGenerator, resolve_llm_path
    from grlm_ray.lib.termgen import ANSWER_PREFIX, answer_settled, parse_terms

    cfg = LLMConfig(cache_dir=str(model_cache), max_new_tokens=32, batch_size=2)
    gen = TransformersGenerator(resolve_llm_path(cfg), cfg, threads=2)
    conv = [{"role": "user", "content": "Write 5 comma-separated words for: Argan Oil Repair Shampoo, 12 oz."}]
    greedy = gen.generate([conv], prefix=ANSWER_PREFIX)[0]
    assert gen._prompt is not None  # the prompt's prefill is kept
    retry = gen.generate([conv], prefix=ANSWER_PREFIX, temperature=0.7, seed=3)[0]  # reuses it
    fresh = TransformersGenerator(resolve_llm_path(cfg), cfg, threads=2)
    assert fresh.generate([conv], prefix=ANSWER_PREFIX, temperature=0.7, seed=3)[0] == retry
    stop = functools.partial(answer_settled, n=5)
    early = gen.generate([conv], prefix=ANSWER_PREFIX, stop=stop)[0]
    assert greedy.startswith(early) and answer_settled(early, 5) or early == greedy
    full, cut = parse_terms(greedy, 5), parse_terms(early, 5)
    assert cut.valid == full.valid and full.terms[:len(cut.terms)] == cut.terms


def test_a_term_writer_past_its_deadline_stops_decoding_and_repairs(model_cache):
    """Serving's term-writer budget: decoding stops at the deadline (the text so far is the start of the
    unbounded answer), no retry starts after it, and the cut answer is repaired with the statistical TID."""
    import json
    import time

    import numpy as np

    from grlm_ray.core.config import CTGConfig, LLMConfig
    from grlm_ray.lib.generation import resolve_llm_path
    from grlm_ray.lib.termgen import ANSWER_PREFIX, TermWriter

    cfg = CTGConfig(retries=2, llm=LLMConfig(cache_dir=str(model_cache), max_new_tokens=24, batch_size=1))
    writer = TermWriter(resolve_llm_path(cfg.llm), cfg, threads=2)
    conv = [{"role": "user", "content": "Write 5 comma-separated words for: Argan Oil Repair Shampoo, 12 oz."}]
    full = writer.gen.generate([conv], prefix=ANSWER_PREFIX)[0]
    cut = writer.gen.generate([conv], prefix=ANSWER_PREFIX, deadline=time.monotonic())[0]
    n_full, n_cut = (len(writer.gen.tok(t, add_special_tokens=False)["input_ids"]) for t in (full, cut))
    assert full.startswith(cut) and n_cut <= 1 < n_full

    statistical = ["shampoo", "argan", "oil", "repair", "hair"]
    batch = {"row": np.arange(1), "item_id": np.array(["sh-1"], dtype=object),
             "category": np.array(["Beauty"], dtype=object), "messages": np.array([json.dumps(conv)], dtype=object),
             "fallback": np.array([json.dumps(["Argan Oil Repair Shampoo", ""])], dtype=object),
             "lexical": np.array([json.dumps(statistical)], dtype=object)}
    late = writer(batch, deadline=time.monotonic())
    assert late["terms"][0].split("\t") == statistical and late["source"][0] == "llm+repair"
    assert late["attempts"][0] == 1 and late["reason"][0].startswith("out of time")
    free = writer(batch)  # no budget: the answer is the model's own or repaired after its retries
    assert free["attempts"][0] == 1 if free["valid"][0] else free["attempts"][0] == 3
    assert not str(free["reason"][0]).startswith("out of time")
