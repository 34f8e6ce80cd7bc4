"""Where checkpoints go and come from: Ray Train's session (``RaySession``, with the stored-folder fallback) or
this process (``LocalSession``, ``train.strategy=single``); each rank seals its checkpoint files."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from typing import Any

from grlm_ray.core.run import Run
from grlm_ray.core.storage import Store

log = logging.getLogger(__name__)
CKPT_TAG = "state"  # DeepSpeed checkpoint tag inside every Ray Train checkpoint
EMA_FILE = "ema.pt"  # train.ema_decay: the weight average inside a checkpoint (rank 0)


def seal_checkpoint(d: str, rank: int) -> None:
    """Write this rank's list of the files it put in checkpoint folder ``d`` (relative path -> bytes), last.
    A folder found in storage is complete when every rank's list is there and every listed file has its
    size (``stored_checkpoints``): ranks upload their folders into one, in no fixed order."""
    files = {}
    for root, _, names in os.walk(d):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), d).replace(os.sep, "/")
            if not rel.startswith("files_rank"):
                files[rel] = os.path.getsize(os.path.join(root, name))
    with open(os.path.join(d, f"files_rank{rank}.json"), "w") as f:
        json.dump(files, f)


def stored_checkpoints(store: Store, rel: str) -> list[tuple[int, str]]:
    """The complete checkpoint folders directly under ``rel`` as (step, rel of the folder), oldest first.
    Complete: ``meta.json`` names the world size, and every rank's ``seal_checkpoint`` list is there with
    each file at its size. Folders from before the seal (no ``world`` in meta) are not listed."""
    from pyarrow.fs import FileSelector, FileType

    found = []
    for info in store.fs.get_file_info(FileSelector(store.path(rel), allow_not_found=True)):
        name = os.path.basename(info.path)
        folder = f"{rel}/{name}"
        if info.type != FileType.Directory or not name.startswith("checkpoint_") or not store.exists(f"{folder}/meta.json"):
            continue
        meta = store.read_json(f"{folder}/meta.json")
        if not isinstance(meta.get("world"), int):
            continue
        complete = True
        for r in range(meta["world"]):
            if not store.exists(f"{folder}/files_rank{r}.json"):
                complete = False
                break
            for sub, size in store.read_json(f"{folder}/files_rank{r}.json").items():
                if store.fs.get_file_info(store.path(f"{folder}/{sub}")).size != size:
                    complete = False
                    break
            if not complete:
                break
        if complete:
            found.append((int(meta["step"]), folder))
    return sorted(found)


class RaySession:
    """The training loop's view of Ray Train: rank, checkpoints, reports, the DDP wrapper.

    ``checkpoints`` (a store and the Ray Train run's folder in it): a job stopped between a checkpoint's
    upload and Ray Train recording it leaves a complete folder that Ray Train's restore does not know;
    ``checkpoint()`` takes the newest complete one in storage when it is newer than Ray Train's."""

    def __init__(self, checkpoints: tuple[Store, str] | None = None) -> None:
        import ray.train

        # Ray Train logs every report at INFO ("Reporting training result ..."); our own progress line is
        # enough. That module names its logger after its file path, not its module name.
        names = ["ray.train"]
        try:
            from ray.train.v2._internal.execution import context as _ctx_module

            names.append(_ctx_module.__file__)
        except ImportError:  # another Ray Train layout: its lines stay
            pass
        for name in names:
            logging.getLogger(name).setLevel(logging.WARNING)
        self._train = ray.train
        self._stored = checkpoints
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def device(self, use_gpu: bool) -> Any:
        import torch

        return self._train.torch.get_device() if use_gpu else torch.device("cpu")

    def prepare(self, model: Any) -> Any:
        return self._train.torch.prepare_model(model) if self.world > 1 else model

    def checkpoint(self) -> Any:
        """The checkpoint to resume from (an object with ``as_directory()``), or None."""
        ckpt = self._train.get_checkpoint()
        found = stored_checkpoints(*self._stored) if self._stored else []
        if not found:
            return ckpt
        step, rel = found[-1]
        if ckpt is not None:
            with ckpt.filesystem.open_input_stream(f"{ckpt.path}/meta.json") as f:
                if int(json.loads(f.read())["step"]) >= step:
                    return ckpt
        store = self._stored[0]
        log.warning("resuming from %s (step %d): complete in storage, newer than Ray Train's record (%s)",
                    store.uri(rel), step, "none" if ckpt is None else ckpt.path)
        return LocalCheckpoint(store.uri(rel), store, rel)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        ckpt = self._train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=ckpt)


class LocalCheckpoint:
    def __init__(self, path: str, store: Store, rel: str) -> None:
        self.path, self._store, self._rel = path, store, rel

    @contextlib.contextmanager
    def as_directory(self):
        with tempfile.TemporaryDirectory(prefix="grlm-ckpt-") as d:
            yield self._store.local_dir(self._rel, d)


class LocalSession:
    """``train.strategy=single``: the same loop in this process, no Ray. Checkpoints go to
    ``<train>/single/checkpoint_<step>`` in the run's store (the newest ``keep`` are kept); a second call
    resumes from the newest complete one."""

    rank, world = 0, 1

    def __init__(self, store: Store, rel: str, keep: int) -> None:
        self.store, self.rel, self.keep = store, rel, keep
        self.history: list[dict[str, Any]] = []
        self.latest: LocalCheckpoint | None = None

    def device(self, use_gpu: bool) -> Any:
        import torch

        return torch.device("cuda" if use_gpu else "cpu")

    def prepare(self, model: Any) -> Any:
        return model

    def _steps(self) -> list[int]:
        """Steps of the complete checkpoints (those with their meta.json), oldest first."""
        from pyarrow.fs import FileSelector, FileType

        infos = self.store.fs.get_file_info(FileSelector(self.store.path(self.rel), allow_not_found=True))
        names = [os.path.basename(i.path) for i in infos if i.type == FileType.Directory]
        return sorted(int(n.split("_", 1)[1]) for n in names if n.startswith("checkpoint_")
                      and self.store.exists(f"{self.rel}/{n}/meta.json"))

    def checkpoint(self) -> LocalCheckpoint | None:
        steps = self._steps()
        if not steps:
            return None
        rel = f"{self.rel}/checkpoint_{steps[-1]:08d}"
        self.latest = LocalCheckpoint(self.store.uri(rel), self.store, rel)
        return self.latest

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self.history.append(dict(metrics))
        if checkpoint_dir:
            step = int(metrics["step"])
            rel = f"{self.rel}/checkpoint_{step:08d}"
            # meta.json last: a checkpoint folder without it is incomplete and never resumed from
            for name in sorted(os.listdir(checkpoint_dir), key=lambda n: n == "meta.json"):
                with open(os.path.join(checkpoint_dir, name), "rb") as f:
                    self.store.write_bytes(f"{rel}/{name}", f.read())
            self.latest = LocalCheckpoint(self.store.uri(rel), self.store, rel)
            for old in self._steps()[:-self.keep]:
                self.store.delete_dir(f"{self.rel}/checkpoint_{old:08d}")


def progress(cfg: Any) -> dict[str, Any]:
    """How far a started, unfinished training got (``grlm status``): its newest complete checkpoint's step (of
    the planned total), training minutes (validation excluded), the last and the best validation point. Reads
    the run's store only: the same answer while the job runs, after it was stopped, or from another machine."""
    from pyarrow.fs import FileSelector, FileType

    run = Run.of(cfg)
    store = run.store
    folders = [run.rel("train", "single")]
    for info in store.fs.get_file_info(FileSelector(run.path("train", "ray"), allow_not_found=True)):
        if info.type == FileType.Directory:
            folders.append(run.rel("train", f"ray/{os.path.basename(info.path)}"))
    found = [c for rel in folders for c in stored_checkpoints(store, rel)]
    if not found:
        return {"checkpoint": None}
    step, folder = max(found)
    meta = store.read_json(f"{folder}/meta.json")
    out: dict[str, Any] = {"checkpoint_step": step, "total_steps": meta.get("total_steps"),
                           "train_minutes": round(float(meta.get("train_seconds") or 0.0) / 60, 1)}
    val = meta.get("validation") or {}
    points = val.get("points") or []
    if points:
        last = points[-1]
        out["last_validation"] = {k: last.get(k) for k in ("step", "recall_at_10", "ndcg_at_10")}
        out["best_validation"] = {"step": val.get("best_step"), "value": val.get("best")}
    return out
