"""The run handle: where one run's artifacts live, spelled in one place.

A run is ``<root>/<name>/``; each stage writes under ``<name>/<stage>/`` what ``core/registry.py`` declares
for it (``Stage.outputs`` and ``Stage.optional``), and a few files belong to the run itself (``RUN_FILES``:
its config, the serving catalog's updates, a comparison). Code that reads another stage's output asks the
handle (``run.read_table("prepare", "items.parquet", ITEMS)``, ``run.local_dir("train", "model", cache)``)
instead of writing the path by hand: an output a stage does not declare is refused with the stage's list, so
a renamed artifact breaks at the reader's first call, not as a missing file three stages later.

    run = Run.of(cfg)                          # cfg.run.root, cfg.run.name, cfg.run.s3
    other = run.named("bench-beauty-valid")    # same store, another run
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Any, Callable, Iterator

from grlm_ray.core.errors import ConfigError, GrlmError
from grlm_ray.core.registry import RUN_FILES, declared, key_sections, reads, require_output, stage_key
from grlm_ray.core.registry import stage as registry_stage  # noqa: I001 - `stage` is a parameter name here
from grlm_ray.core.storage import StageContext, Store, read_manifest, run_stage

if TYPE_CHECKING:
    import pyarrow as pa

    from grlm_ray.core.config import GrlmConfig, S3Config
    from grlm_ray.core.schemas import ArtifactSchema


class Run:
    """One run's artifacts: ``<root>/<name>/<stage>/<output>``, each output declared by its stage."""

    def __init__(self, root: str, name: str, s3: "S3Config | None" = None, store: Store | None = None,
                 cfg: "GrlmConfig | None" = None) -> None:
        self.root, self.name, self.cfg = root, name, cfg
        self.store = store if store is not None else Store(root, s3)
        self._s3 = s3

    @classmethod
    def of(cls, cfg: "GrlmConfig") -> "Run":
        """The run ``cfg`` names (``run.root``, ``run.name``, ``run.s3``); it can run ``cfg``'s stages."""
        return cls(cfg.run.root, cfg.run.name, cfg.run.s3, cfg=cfg)

    def named(self, name: str) -> "Run":
        """Another run under the same root (and the same store)."""
        return Run(self.root, name, self._s3, self.store)

    def run_stage(self, stage: str, body: Callable[[StageContext], None], *, key: str | None = None,
                  inputs: dict[str, tuple[str, str] | str] | None = None) -> dict[str, Any]:
        """``storage.run_stage`` for one of this config's stages: its key (``registry.stage_key`` unless given)
        chained with the stages it reads, ``run.resume``, and ``inputs`` recorded in its manifest (a
        (stage, output) pair as its URI, a string as it is)."""
        if self.cfg is None:
            raise GrlmError(f"{self!r} was not made from a config (Run.of(cfg)): it cannot run a stage")
        keyed = registry_stage(stage).keyed_config(self.cfg)
        dump = keyed.model_dump(mode="json")
        return run_stage(self.store, self.name, stage, key or stage_key(self.cfg, stage), body,
                         resume=self.cfg.run.resume, after=reads(stage, self.cfg),
                         inputs={k: v if isinstance(v, str) else self.uri(*v) for k, v in (inputs or {}).items()},
                         config={s: dump[s] for s in key_sections(keyed, stage)})

    # -- paths -----------------------------------------------------------------------------------------
    def rel(self, stage: str, output: str = "") -> str:
        """``<name>/<stage>[/<output>]`` relative to the root; ``output`` must be declared by the stage."""
        output = output.strip("/")
        require_output(stage, output)
        return f"{self.name}/{stage}/{output}" if output else f"{self.name}/{stage}"

    def file(self, name: str) -> str:
        """A file of the run itself (not of a stage), one of ``registry.RUN_FILES``."""
        name = name.strip("/")
        if not declared(name, RUN_FILES):
            raise ConfigError(f"{name!r} is not a file of the run (declared: {', '.join(RUN_FILES)}: core/registry.py)")
        return f"{self.name}/{name}"

    def uri(self, stage: str, output: str = "") -> str:
        return self.store.uri(self.rel(stage, output))

    def path(self, stage: str, output: str = "") -> str:
        return self.store.path(self.rel(stage, output))

    def exists(self, stage: str, output: str = "") -> bool:
        return self.store.exists(self.rel(stage, output))

    # -- reads -----------------------------------------------------------------------------------------
    def read_table(self, stage: str, output: str, schema: "ArtifactSchema | None" = None,
                   columns: list[str] | None = None) -> "pa.Table":
        return self.store.read_table(self.rel(stage, output), schema, columns)

    def read_batches(self, stage: str, output: str, schema: "ArtifactSchema | None" = None,
                     columns: list[str] | None = None, batch_rows: int = 65536) -> Iterator["pa.Table"]:
        return self.store.read_batches(self.rel(stage, output), schema, columns, batch_rows=batch_rows)

    def read_json(self, stage: str, output: str) -> Any:
        return self.store.read_json(self.rel(stage, output))

    def write_json(self, stage: str, output: str, obj: Any) -> None:
        """A declared output written after its stage ran (``grlm diagnose``'s report beside the model)."""
        self.store.write_json(self.rel(stage, output), obj)

    def local_dir(self, stage: str, output: str, cache: str) -> str:
        """A local copy of a folder output (the folder itself for a local root; from S3 a download, made again
        when the stage has run again since: its manifest's key and finish time name the copy)."""
        m = read_manifest(self.store, self.name, stage) or {}
        version = hashlib.sha256(json.dumps([m.get("config_hash"), m.get("generation"), m.get("finished_at")])
                                 .encode()).hexdigest()[:12] if m else ""
        return self.store.local_dir(self.rel(stage, output), cache, version)

    def training_cost(self) -> dict[str, Any]:
        """The finished train stage's steps and minutes on the loop's clock (``training_cost``)."""
        m = read_manifest(self.store, self.name, "train") or {}
        curve = self.read_json("train", "validation_curve.json") if self.exists("train", "validation_curve.json") else []
        return training_cost(m.get("info") or {}, curve)

    def __repr__(self) -> str:
        return f"Run({self.store.uri(self.name)!r})"


# --------------------------------------------------------------------------- train.members
def training_cost(info: dict[str, Any], curve: list[dict[str, Any]]) -> dict[str, Any]:
    """A training's steps and minutes on the loop's clock (training steps only, validation excluded, carried across
    the attempts of a run that was stopped and resumed) from its train manifest's info and validation curve.
    Manifests written before the train stage recorded that clock (no ``attempt_seconds``) hold the wall time of
    the run's last attempt only — short for a resumed run: the clock is then read from the curve's point at the
    last step when there is one."""
    steps, seconds = info.get("steps"), info.get("train_seconds")
    if "attempt_seconds" not in info and curve and curve[-1].get("step") == steps:
        seconds = float(curve[-1]["train_minutes"]) * 60
    return {"steps": steps, "minutes": round(seconds / 60, 1) if seconds else None}


def member_runs(cfg: "GrlmConfig") -> list[str]:
    """The run names of the members beside the run's own model (``members/members.json``); [] for one model."""
    if cfg.train.members == 1:
        return []
    run = Run.of(cfg)
    if not run.exists("members", "members.json"):
        raise GrlmError(f"train.members={cfg.train.members}: {run.uri('members', 'members.json')} does not exist: "
                        "train the members first (`grlm members CONFIG`, or `grlm eval CONFIG`, which runs them)")
    names = [r["run"] for r in run.read_json("members", "members.json")["members"]]
    if len(names) != cfg.train.members - 1:
        raise GrlmError(f"train.members={cfg.train.members} but {run.uri('members', 'members.json')} lists "
                        f"{len(names)} other members: run `grlm members CONFIG` again")
    return names


def member_model_dirs(cfg: "GrlmConfig", cache: str) -> list[str]:
    """Local folders of the members' exported models (downloaded into ``cache`` from an S3 root)."""
    run = Run.of(cfg)
    return [run.named(name).local_dir("train", "model", os.path.join(cache, name)) for name in member_runs(cfg)]
