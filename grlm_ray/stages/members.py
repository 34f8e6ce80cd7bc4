"""The recipe's other seeds (``train.members``): N models that decode as one.

Contract: the run's sft stage (after its train stage) -> runs ``<run>-member<n>`` (n = 1 .. members-1), each the run's config with
``model.seed`` and ``train.seed`` raised by n, its upstream stages copied from the run and its own train stage
(resumable, keyed like any run's: a member a user trained by hand with those seeds is the same training) ->
``members/members.json`` (each member's run, seeds, exported model, training seconds, validation best).
The eval stage and the Serve generator decode with the run's model and these as one (their folders:
``core/run.py: member_model_dirs``; the mean of their next-token log-probs: ``lib/decoding.py:
LogProbEnsemble``). Member 0 is the run's own train stage.
"""

from __future__ import annotations

import logging
from typing import Any

from grlm_ray.core import registry
from grlm_ray.core.config import GrlmConfig
from grlm_ray.core.run import Run
from grlm_ray.core.storage import StageContext, copy_stages

log = logging.getLogger(__name__)
STAGE = "members"


def member_config(cfg: GrlmConfig, n: int) -> GrlmConfig:
    """Member ``n`` (1 .. train.members-1): the run's config in run ``<run>-member<n>`` with ``model.seed`` and
    ``train.seed`` raised by ``n``; a single model itself (``train.members=1``)."""
    if not 1 <= n < cfg.train.members:
        raise ValueError(f"member {n}: train.members={cfg.train.members} has members 1..{cfg.train.members - 1}")
    data = cfg.model_dump(mode="json")
    data["run"]["name"] = f"{cfg.run.name}-member{n}"
    data["model"]["seed"] = cfg.model.seed + n
    data["train"]["seed"] = cfg.train.seed + n
    data["train"]["members"] = 1
    return GrlmConfig.model_validate(data)


def members(cfg: GrlmConfig) -> dict[str, Any]:
    run = Run.of(cfg)
    train = registry.stage("train").function()

    def body(ctx: StageContext) -> None:
        rows = []
        for n in range(1, cfg.train.members):
            mc = member_config(cfg, n)
            # the data, TIDs and SFT samples are the run's: copied, not made again (a copy that exists is kept)
            copy_stages(run.store, cfg.run.name, mc.run.name, registry.upstream("sft", mc))
            log.info("train.members: member %d of %d (run %s, seeds model %d / train %d)", n + 1,
                     cfg.train.members, mc.run.name, mc.model.seed, mc.train.seed)
            m = train(mc)  # skipped when complete, resumed when half-done
            info = m.get("info", {})
            rows.append({"member": n, "run": mc.run.name, "model_seed": mc.model.seed, "train_seed": mc.train.seed,
                         "model": Run.of(mc).uri("train", "model"), "train_seconds": info.get("train_seconds"),
                         "stage_seconds": m.get("seconds"), "steps": info.get("steps"),
                         "validation_best": (info.get("validation") or {}).get("best"), "reused": bool(m.get("skipped"))})
        ctx.store.write_json(ctx.rel("members.json"), {"members": rows})
        ctx.info.update({"members": rows, "count": cfg.train.members,
                         "train_seconds": round(sum(r["train_seconds"] or 0.0 for r in rows), 2)})

    return run.run_stage(STAGE, body, inputs={"sft": ("sft", "sft.parquet")})
