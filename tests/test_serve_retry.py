"""The ingress's retry and shedding rules on their own (no Ray runtime): which failures are retried, how
often, within which deadline, and what the caller is told."""

import asyncio
import time

import pytest

from grlm_ray.core.config import GrlmConfig


def _retrier(**retry):
    from grlm_ray.serving.app import Retrier

    cfg = GrlmConfig.model_validate({"serve": {"retry": {"backoff_s": 0.01, "max_backoff_s": 0.02, **retry}}})
    return Retrier(cfg)


def _flaky(failures):
    """A call that raises each of ``failures`` in turn, then answers 'ok'; counts its calls."""
    calls = []

    async def call():
        calls.append(1)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return "ok"

    return call, calls


def test_a_dead_replica_is_retried_until_a_live_one_answers():
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    call, calls = _flaky([ActorDiedError(), ActorUnavailableError("restarting", None)])
    res, retries = asyncio.run(_retrier(max_attempts=5)(call, "generator", time.monotonic() + 10))
    assert (res, retries, len(calls)) == ("ok", 2, 3)


def test_retries_stop_at_max_attempts_and_at_the_deadline():
    from ray.exceptions import ActorDiedError

    from grlm_ray.serving.app import ApiError

    call, calls = _flaky([ActorDiedError()] * 10)
    with pytest.raises(ApiError) as e:
        asyncio.run(_retrier(max_attempts=3)(call, "grounder", time.monotonic() + 10))
    assert e.value.status == 503 and "grounder" in e.value.message and "3 attempts" in e.value.message
    assert len(calls) == 3 and e.value.headers == {"Retry-After": "1"}
    call, calls = _flaky([ActorDiedError()] * 10)
    with pytest.raises(ApiError):  # deadline already (almost) gone: no waiting past it
        asyncio.run(_retrier(max_attempts=10)(call, "grounder", time.monotonic() + 0.005))
    assert len(calls) == 1


def test_a_full_queue_is_not_retried_but_answered_503_with_retry_after():
    from ray.serve.exceptions import BackPressureError

    from grlm_ray.serving.app import ApiError

    call, calls = _flaky([BackPressureError(num_queued_requests=16, max_queued_requests=16, retry_after_s=2.5)])
    with pytest.raises(ApiError) as e:
        asyncio.run(_retrier()(call, "generator", time.monotonic() + 10))
    assert len(calls) == 1 and e.value.status == 503 and e.value.headers == {"Retry-After": "3"}
    assert "overloaded" in e.value.message


def test_other_errors_are_not_retried():
    call, calls = _flaky([ValueError("a bug")])
    with pytest.raises(ValueError):
        asyncio.run(_retrier()(call, "generator", time.monotonic() + 10))
    assert len(calls) == 1
