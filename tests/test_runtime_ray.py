"""The Ray runtime helper: local head on loopback, and a Ray Data actor pool that does not deadlock."""

import numpy as np
import pytest

pytestmark = pytest.mark.ray


def test_local_ray_binds_loopback(ray_local):
    nodes = ray_local.nodes()
    assert nodes and all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes)
    assert ray_local.cluster_resources()["CPU"] == 2


def test_a_local_head_leaves_rays_default_dashboard_port_to_a_cluster(ray_local):
    """A local run's head takes a free port for its dashboard: `ray start --head` on the same machine keeps 8265,
    so `ray job submit --address http://127.0.0.1:8265` reaches the cluster, not a local run."""
    url = ray_local._private.worker.get_dashboard_url()
    assert url and url.startswith("127.0.0.1:") and not url.endswith(":8265")


def test_actor_pool_with_fractional_cpus_completes(ray_local):
    import ray.data

    from grlm_ray.core.config import RayConfig
    from grlm_ray.core.runtime import actor_pool_kwargs

    class Square:
        def __init__(self):
            self.calls = 0

        def __call__(self, batch):
            self.calls += 1
            return {"x": batch["id"], "y": batch["id"] ** 2}

    ds = ray.data.range(1000, override_num_blocks=8).map_batches(
        Square, batch_size=50, **actor_pool_kwargs(RayConfig(), size=2))
    out = ds.to_pandas().sort_values("x")
    assert np.array_equal(out["y"].to_numpy(), np.arange(1000) ** 2)


def test_every_worker_of_a_local_head_knows_its_cluster(ray_local):
    """Ray's state API (used by Ray Train's PlacementGroupCleaner to see whether its controller lives) scans
    the machine for Ray instances unless RAY_ADDRESS is set; with two local heads it asked the wrong one and
    removed a live training's placement group. Every worker gets this head's address."""
    import os

    ray = ray_local

    @ray.remote
    def address() -> str | None:
        return os.environ.get("RAY_ADDRESS")

    assert ray.get(address.remote()) == ray.get_runtime_context().gcs_address
    assert "RAY_GCS_SERVER_PORT" not in os.environ  # a later head in this process picks its own port
