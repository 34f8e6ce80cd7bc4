"""The run handle (grlm_ray/core/run.py): every artifact path spelled once, from what the stage graph
declares. No Ray, no models: a local store under tmp_path."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pytest

from grlm_ray.core.config import load_config
from grlm_ray.core.errors import ConfigError, GrlmError
from grlm_ray.core.registry import RUN_FILES, STAGES, declared
from grlm_ray.core.run import Run
from grlm_ray.core.schemas import CATALOG_UPDATES
from grlm_ray.core.storage import StageContext

PACKAGE = Path(__file__).resolve().parents[1] / "grlm_ray"


def test_declared_outputs_folders_and_patterns_resolve_and_anything_else_is_refused_with_the_list(tmp_path):
    run = Run(str(tmp_path), "r1")
    assert run.rel("prepare", "items.parquet") == "r1/prepare/items.parquet"
    assert run.rel("train", "model") == "r1/train/model"                         # a declared folder ...
    assert run.rel("train", "model/config.json") == "r1/train/model/config.json"  # ... and a file in it
    assert run.rel("compress", "k64/terms.parquet") == "r1/compress/k64/terms.parquet"  # k<K>/terms.parquet
    assert run.rel("eval") == "r1/eval"
    assert run.uri("sft", "terms.parquet") == str(tmp_path / "r1" / "sft" / "terms.parquet")
    with pytest.raises(ConfigError, match=r"'item.parquet' is not an output of stage 'prepare' \(it declares "
                                          r"items.parquet, sequences.parquet"):
        run.rel("prepare", "item.parquet")
    with pytest.raises(ConfigError, match="'k64/sweep.json' is not an output of stage 'compress'"):
        run.rel("compress", "k64/sweep.json")
    with pytest.raises(ConfigError, match="unknown stage 'training'"):
        run.rel("training", "model")
    assert not declared("k/terms.parquet", ("k<K>/terms.parquet",))  # a pattern stands for a non-empty segment


def test_run_files_are_their_own_list_and_the_catalog_updates_are_one_of_them(tmp_path):
    run = Run(str(tmp_path), "r1")
    assert run.file(CATALOG_UPDATES) == "r1/serve/catalog_updates.parquet"
    assert run.file("compare/comparison.png") == "r1/compare/comparison.png"
    assert "config.yaml" in RUN_FILES
    with pytest.raises(ConfigError, match="'notes.txt' is not a file of the run"):
        run.file("notes.txt")


def test_reads_go_through_the_same_store_and_another_run_shares_it(tmp_path):
    run = Run(str(tmp_path), "r1")
    t = pa.table({"item_id": ["a", "b"]})
    run.store.write_table(run.rel("prepare", "holdout_items.parquet"), t)
    assert run.exists("prepare", "holdout_items.parquet") and not run.exists("prepare", "items.parquet")
    assert run.read_table("prepare", "holdout_items.parquet").equals(t)
    other = run.named("r2")
    assert other.store is run.store and other.rel("eval", "predictions.parquet") == "r2/eval/predictions.parquet"
    assert other.cfg is None
    with pytest.raises(GrlmError, match="was not made from a config"):
        other.run_stage("eval", lambda ctx: None)


def test_a_stage_runs_through_the_handle_with_its_chained_key_and_inputs_as_uris(tmp_path):
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=r1"])
    run = Run.of(cfg)

    def body(ctx: StageContext) -> None:
        ctx.write("items.parquet", pa.table({"item_id": ["a"]}))

    first = run.run_stage("prepare", body, inputs={"source": "inline", "spec": ("prepare", "items.parquet")})
    assert first["status"] == "complete" and first["inputs"]["source"] == "inline"
    assert first["inputs"]["spec"] == run.uri("prepare", "items.parquet")
    assert run.run_stage("prepare", body)["skipped"]  # same key: complete, not run again


def test_a_stage_reading_another_stages_undeclared_output_is_refused(tmp_path):
    run = Run(str(tmp_path), "r1")
    ctx = StageContext(run.store, "r1", "train")
    assert ctx.stage_rel("sft", "sft.parquet") == "r1/sft/sft.parquet"
    assert ctx.stage_rel("train", "anything/it/writes") == "r1/train/anything/it/writes"  # its own folder: free
    with pytest.raises(ConfigError, match="'samples.parquet' is not an output of stage 'sft'"):
        ctx.stage_rel("sft", "samples.parquet")


def test_no_module_outside_the_storage_layer_spells_an_artifact_path_or_builds_its_own_store():
    """The drift guard of the run handle: an f-string ``{run}/<stage>/...`` or ``Store(cfg.run.root, ...)``
    anywhere else is a path written by hand."""
    stage_path = re.compile(r"\}/(%s)(/|\b)" % "|".join(STAGES))
    own_store = re.compile(r"Store\(\s*(cfg|self\.cfg)\.run\.root")
    allowed = {PACKAGE / "core" / "run.py", PACKAGE / "core" / "storage.py"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in allowed:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if ('f"' in code or "f'" in code) and stage_path.search(code) or own_store.search(code):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
