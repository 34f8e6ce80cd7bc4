"""Fault injection for tests, read in one place: the environment variable ``GRLM_FAULTS`` (never a config
field, so production configs and their stage keys know nothing of it).

Format: comma-separated ``<point>@<n>`` entries. Points:

- ``train_step@N``: the training worker of the last rank (rank 1 of 2) exits the process at step N, once —
  not after the group restarted from a checkpoint — so Ray Train's failure handling is exercised for real.

The driver reads the variable (``spec``) and hands the parsed entries to the workers with the rest of their
inputs; workers never read the environment themselves.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)
ENV = "GRLM_FAULTS"
POINTS = ("train_step",)


def spec(env: dict[str, str] | None = None) -> dict[str, int]:
    """The faults requested in the environment, e.g. ``{"train_step": 5}``; ``{}`` when none."""
    raw = (env if env is not None else os.environ).get(ENV, "").strip()
    out: dict[str, int] = {}
    for entry in filter(None, (e.strip() for e in raw.split(","))):
        point, sep, at = entry.partition("@")
        if not sep or point not in POINTS or not at.isdigit():
            raise ValueError(f"{ENV}={raw!r}: entries are <point>@<step> with point one of {POINTS}, got {entry!r}")
        out[point] = int(at)
    return out


def due(faults: dict[str, int] | None, point: str, at: int) -> bool:
    return bool(faults) and faults.get(point) == at


def crash(point: str, at: int, who: str) -> None:
    """Exit this process without cleanup (as a killed worker would)."""
    log.warning("fault injection (%s=%s@%d): %s exits", ENV, point, at, who)
    # Ray Train's controller registers reported checkpoints asynchronously: let it take the last one first,
    # so "resume from the last checkpoint before the failure" is what a test observes
    time.sleep(5)
    os._exit(1)
