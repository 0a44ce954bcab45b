"""The text of spo_ray.timeouts.explain_timeout, without Ray (tests/test_timeouts.py raises
the real timeouts against a local Ray)."""

from __future__ import annotations

import ray

from spo_ray.timeouts import explain_timeout
from tests.conftest import compose


def test_a_pool_that_fits_actor_by_actor_but_not_as_a_whole_is_named(monkeypatch):
    # Ray Data waits for all 4 rollout actors; 4 × 1 CPU never fit in a 2-CPU cluster,
    # although each actor alone would.
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    _, cfg = compose(["experiment=tiny", "cluster.rollout.num_actors=4", "cluster.rollout.num_cpus=1"])
    err = explain_timeout(RuntimeError("GetTimeoutError: Timed out while starting actors."), cfg, 1)
    text = str(err)
    assert isinstance(err, TimeoutError)
    assert text.startswith("iteration 1: the rollout pool (RolloutStage × 4, 1 CPU + 0 GPU each) did not start"), text
    assert "the 4 RolloutStage actors ask for 4 × 1 = 4 CPU together but the whole cluster has 2" in text
