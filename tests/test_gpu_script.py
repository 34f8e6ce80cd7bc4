"""benchmarks/gpu/recipe_on_gpu.py, the GPU check, run on the CPU with a tiny budget: the pack step carries a
run's prepared data and SFT samples, the run step trains (train.strategy=single), decodes the test users with
constrained beam search and scores them, in a process that never imports Ray (the GPU machine has none)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "recipe_on_gpu.py"


@pytest.mark.ray
@pytest.mark.slow
def test_the_gpu_script_packs_trains_and_scores_without_ray(tmp_path, tiny_sft_run):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import recipe_on_gpu
    finally:
        sys.path.remove(str(SCRIPT.parent))

    run = recipe_on_gpu.pack(None, tiny_sft_run, tmp_path / "pack")  # every stage complete: copied, not rerun
    assert sorted(p.name for p in (run / "sft").iterdir()) == ["_manifest.json", "sft.parquet", "terms.parquet"]
    assert (run / "config.yaml").is_file()  # the resolved config the run step trains with
    assert not (run / "embed").exists()  # only what the GPU side reads travels
    tok = run / recipe_on_gpu.TOKENIZER  # the scratch model's tokenizer travels, its LM's weights do not
    assert (tok / "tokenizer.json").is_file()
    assert not [f for f in tok.iterdir() if f.suffix in recipe_on_gpu.WEIGHTS]

    small = [o for o in TINY if not o.startswith(("train.num_workers", "train.micro_batch"))]
    cmd = [sys.executable, str(SCRIPT), "run", str(run / "config.yaml"), *small,
           "train.validation.users=10", "--pack", str(tmp_path / "pack"), "--device", "cpu", "--max-steps", "4",
           "--users", "20", "--threads", "1", "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, cwd=SCRIPT.parents[2], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu_recipe_demo.json").read_text())
    assert result["ray_imported"] is False
    assert result["train"]["steps"] == 4 and result["train"]["validation"]["points"]
    assert result["decode"]["backend"] == "transformers" and "no GPU" in result["decode"]["why"]
    m = result["metrics"]
    assert m["users"] == 20 and m["vr_at_10"] == 1.0 and 0 <= m["recall_at_10"] <= 1
    assert (run / "train" / "model" / "config.json").is_file()  # trained into the pack
    # the packed tokenizer (the result file writes machine paths as <local>), not the model package (pkg://...)
    assert Path(result["train"]["backbone_source"]).name == recipe_on_gpu.TOKENIZER
