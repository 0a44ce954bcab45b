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


def test_a_stream_on_the_run_engines_blames_the_judge_not_the_engines_resources(monkeypatch):
    # The engines hold the rollout GPUs (and started); the stream's rollout stage is tasks
    # that reserve nothing, with no actor to start.
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    _, cfg = compose(["experiment=tiny", "cluster.gpus_per_node=4", "cluster.rollout.num_gpus=1", "cluster.judge.num_gpus=2"])
    text = str(explain_timeout(RuntimeError("Timed out while starting actors."), cfg, 1, engines=True))
    assert text.startswith("iteration 1: the judge pool (JudgeStage × 1, 0.25 CPU + 2 GPU each) did not start"), text
    plain = str(explain_timeout(RuntimeError("Timed out while starting actors."), cfg, 1))
    assert "judge pool" in plain and "rollout pool" not in plain  # the rollout's 1 GPU fits: not named either way
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})  # no GPU at all
    on_engines = str(explain_timeout(RuntimeError("Timed out while starting actors."), cfg, 1, engines=True))
    assert "RolloutStage" not in on_engines and "each JudgeStage actor asks for 2 GPU" in on_engines, on_engines
    assert "each RolloutStage actor asks for 1 GPU" in str(explain_timeout(RuntimeError("Timed out while starting actors."), cfg, 1))
    # On the run's engines and judges the stream starts no actor: such a timeout is not its own.
    assert explain_timeout(RuntimeError("Timed out while starting actors."), cfg, 1, engines=True, judges=True) is None
