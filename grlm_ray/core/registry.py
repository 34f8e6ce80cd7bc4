"""The stage graph, declared once: one record per stage.

prepare -> embed -> neighbors -> ctg -> compress -> sft -> train -> members -> eval (and baseline beside them).
Everything that walks the pipeline reads this table: the order and dispatch of ``pipeline.run_pipeline``,
``reads`` / ``upstream`` (which stages a stage needs), each stage's key (``stage_key`` below, chained with its
upstream keys by ``storage.run_stage``), the CLI verbs and their help, the MLflow params of a stage run
(``tracking.log_stage``) and the ``ray job submit`` entrypoint (``jobs/grlm.py``).

Adding a stage = one module with ``def my_stage(cfg: GrlmConfig) -> manifest`` that calls
``storage.run_stage(..., stage_key(cfg, NAME), ..., after=reads(NAME, cfg))``, and one ``Stage`` record here.
No stage module is imported until its stage runs (``Stage.function``).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from grlm_ray.core.errors import ConfigError

if TYPE_CHECKING:  # the config module is light, but the registry only needs its type
    from grlm_ray.core.config import GrlmConfig

Reads = Callable[["GrlmConfig"], tuple[str, ...]]


def _load(spec: str) -> Any:
    """The function a ``"module:function"`` string names (its module imported now)."""
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Stage:
    """One stage: what runs it, what it reads, what it writes, what its result depends on."""

    name: str
    entry: str                                  # "module:function", imported when the stage runs
    verb: str                                   # `grlm VERB CONFIG [key=value ...]`
    help: str                                   # one line, for `grlm --help`
    sections: tuple[str, ...]                   # config sections in the stage's own key
    reads: tuple[str, ...] | Reads              # stages whose outputs it reads (their keys chain into its key)
    outputs: tuple[str, ...]                    # what it always writes under <run>/<stage>/ (schemas: schemas.py)
    tracked: tuple[str, ...] = ()               # config sections logged as the MLflow run's params
    optional: tuple[str, ...] = ()              # what it writes under some settings (named in the comment)
    in_demo: bool = True                        # part of `grlm demo` / jobs/grlm.py demo
    checks: str | None = None                   # "module:function": cfg -> problems, run before any stage
    keyed: str | None = None                    # "module:function": cfg -> the config its key hashes, where the
                                                # stage resolves settings before it runs (train.precision=auto)
    progress: str | None = None                 # "module:function": cfg -> how far a started, unfinished run of
                                                # the stage got (`grlm status`)

    def function(self) -> Callable[["GrlmConfig"], dict[str, Any]]:
        return _load(self.entry)

    def check_function(self) -> Callable[["GrlmConfig"], list[str]] | None:
        return None if self.checks is None else _load(self.checks)

    def keyed_config(self, cfg: "GrlmConfig") -> "GrlmConfig":
        return cfg if self.keyed is None else _load(self.keyed)(cfg)

    def progress_function(self) -> Callable[["GrlmConfig"], dict[str, Any]] | None:
        return None if self.progress is None else _load(self.progress)

    def read_stages(self, cfg: "GrlmConfig") -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.reads(cfg) if callable(self.reads) else self.reads))


def _terms_stage(cfg: "GrlmConfig") -> str:
    return {"ctg": "ctg", "provided": "prepare", "compress": "compress"}[cfg.sft.terms]


def _compress_reads(cfg: "GrlmConfig") -> tuple[str, ...]:
    return ("prepare",) if cfg.compress.source == "provided" else ("prepare", "embed", "ctg")


def _eval_reads(cfg: "GrlmConfig") -> tuple[str, ...]:
    return ("prepare", "sft", "train") + (("members",) if cfg.train.members > 1 else ())


def _train_sections(cfg: "GrlmConfig") -> tuple[str, ...]:
    # the sentence embedder shapes the initial weights under model.embed_init=embedder
    return ("embed",) if cfg.model.embed_init == "embedder" else ()


REGISTRY: tuple[Stage, ...] = (
    Stage("prepare", "grlm_ray.stages.prepare:prepare", "prep", "stage 1: prepare catalog, sequences and targets",
          sections=("data",), reads=(), outputs=("items.parquet", "sequences.parquet", "targets.parquet",
                                                 "raw_text.parquet", "rejects.parquet"),
          tracked=("data",),  # a source's own TIDs; data.holdout's held-out items and their validation targets
          optional=("terms.parquet", "holdout_items.parquet", "holdout_targets.parquet"),
          checks="grlm_ray.stages.prepare:check_sources"),
    Stage("embed", "grlm_ray.stages.embed:embed", "embed", "stage 2: sentence embeddings of item text (Ray Data)",
          sections=("data", "embed"), reads=("prepare",), outputs=("embeddings.parquet",), tracked=("data", "embed")),
    Stage("neighbors", "grlm_ray.stages.neighbors:neighbors", "neighbors", "stage 2: top-k cosine neighbours (Ray Data, faiss)",
          sections=("data", "embed", "neighbors"), reads=("embed",), outputs=("neighbors.parquet",),
          tracked=("neighbors",)),
    Stage("ctg", "grlm_ray.stages.ctg:ctg", "ctg", "stage 3: Context-aware Term Generation with an LLM (Ray Data)",
          sections=("data", "embed", "neighbors", "ctg"), reads=("prepare", "neighbors"),
          outputs=("terms.parquet", "terms_llm.parquet"), tracked=("ctg",),
          checks="grlm_ray.stages.prepare:check_item_text"),
    Stage("compress", "grlm_ray.stages.compress:compress", "compress", "stage 3: semantic compression sweep over K (MLflow)",
          sections=("data", "ctg", "compress", "embed"), reads=_compress_reads, outputs=("k<K>/terms.parquet", "sweep.json"),
          tracked=("compress",), in_demo=False),
    Stage("sft", "grlm_ray.stages.sft:sft", "sft", "stage 4: IIFT instruction data (GTI, sequence, collaborative tasks)",
          sections=("data", "sft"), reads=lambda cfg: ("prepare", _terms_stage(cfg)),
          outputs=("sft.parquet", "terms.parquet"), tracked=("sft",)),
    Stage("train", "grlm_ray.stages.train:train", "train", "stage 4: IIFT fine-tuning on Ray Train (DDP or DeepSpeed ZeRO)",
          sections=("data", "sft", "model", "train"), reads=("sft",), outputs=("model/", "tokens.parquet"),
          tracked=("sft", "model", "train"), checks="grlm_ray.stages.train.backbone:check_backbone",
          keyed="grlm_ray.stages.train.schedule:keyed",  # train.precision=auto -> bf16 / fp32 here; not members
          progress="grlm_ray.stages.train.sessions:progress",
          # with train.validation.enabled; a pretrained base; ZeRO; grlm diagnose; checkpoints (Ray Train / single):
          optional=("best/", "validation.parquet", "catalog.parquet", "validation_curve.json", "learning_curve.png",
                    "base/", "base_info.json", "deepspeed.json", "diagnostics.json", "ray/", "single/")),
    Stage("members", "grlm_ray.stages.members:members", "members",
          "stage 4: the recipe's other seeds (train.members), decoded with the run's model as one",
          sections=("data", "sft", "model", "train"), reads=("sft", "train"), outputs=("members.json",),
          tracked=("train",), keyed="grlm_ray.stages.train.schedule:resolved"),  # runs only with train.members > 1
    Stage("eval", "grlm_ray.stages.evaluate:evaluate_stage", "eval", "stage 5: beam search + EIG + Recall/NDCG/VR/DHR (Ray Data)",
          sections=("data", "sft", "model", "train", "eval"), reads=_eval_reads,
          outputs=("predictions.parquet",), tracked=("eval",)),
    Stage("baseline", "grlm_ray.stages.baselines:baseline_stage", "baseline",
          "SASRec (CE or BCE) and popularity on GRLM's splits and users",
          sections=("data", "baseline", "eval"), reads=("prepare",), outputs=("predictions.parquet", "metrics.json"),
          tracked=("baseline", "eval"), in_demo=False),
)
_BY_NAME = {s.name: s for s in REGISTRY}
# files of a run that belong to no stage (``core/run.py``: ``Run.file``): its resolved config, the items added
# to its catalog after training (serving, the cold-start benchmark), a comparison's table and plot, the scale
# benchmark's scratch files
RUN_FILES: tuple[str, ...] = ("config.yaml", "serve/catalog_updates.parquet", "compare/", "bench-scale/", "bench-cold/")
_EXTRA_SECTIONS: dict[str, Callable[["GrlmConfig"], tuple[str, ...]]] = {"train": _train_sections}


STAGES: tuple[str, ...] = tuple(s.name for s in REGISTRY)          # in pipeline order
DEMO_STAGES: tuple[str, ...] = tuple(s.name for s in REGISTRY if s.in_demo)


def stage(name: str) -> Stage:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown stage {name!r}; known: {', '.join(STAGES)}") from None


def declared(output: str, names: tuple[str, ...]) -> bool:
    """``output`` is one of ``names``, a file inside a declared folder (``model/``), or matches a declared
    pattern (``k<K>/terms.parquet``: ``<...>`` stands for one path segment)."""
    for name in names:
        if output in (name, name.rstrip("/")) or (name.endswith("/") and output.startswith(name)):
            return True
        if "<" in name:
            pattern = "[^/]+".join(re.escape(part) for part in re.split(r"<[^>]+>", name))
            if re.fullmatch(pattern + ("(/.*)?" if name.endswith("/") else ""), output):
                return True
    return False


def require_output(name: str, output: str) -> None:
    """ConfigError unless stage ``name`` declares ``output`` (``outputs`` or ``optional``); "" is its folder."""
    spec = stage(name)
    if output and not declared(output, spec.outputs + spec.optional):
        raise ConfigError(f"{output!r} is not an output of stage {name!r} (it declares "
                          f"{', '.join(spec.outputs + spec.optional) or 'nothing'}: core/registry.py)")


def reads(name: str, cfg: "GrlmConfig") -> tuple[str, ...]:
    """The stages whose outputs ``name`` reads directly; its key chains theirs (``storage.run_stage``)."""
    return stage(name).read_stages(cfg)


def upstream(name: str, cfg: "GrlmConfig") -> tuple[str, ...]:
    """The stages ``name`` needs, in pipeline order, ending with itself (finished ones are skipped when run)."""
    need: set[str] = set()
    todo = [name]
    while todo:
        s = todo.pop()
        if s not in need:
            need.add(s)
            todo.extend(reads(s, cfg))
    return tuple(s for s in STAGES if s in need)


def key_sections(cfg: "GrlmConfig", name: str) -> tuple[str, ...]:
    """The config sections stage ``name``'s own key hashes (its ``sections`` + the ones its settings add)."""
    return (*stage(name).sections, *_EXTRA_SECTIONS.get(name, lambda _cfg: ())(cfg))


def stage_key(cfg: "GrlmConfig", name: str, version: str = "") -> str:
    """The stage's own key: a hash of its config sections (+ a format version); ``run_stage`` chains the
    keys of the stages it reads onto it."""
    cfg = stage(name).keyed_config(cfg)
    h = cfg.section_hash(*key_sections(cfg, name))
    return f"{h}-{version}" if version else h
