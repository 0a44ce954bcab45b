"""Issue 6, item 4: a remote wait that cannot finish fails after its `run.timeouts.*` value
with an error naming the stage, the actor, what to check, and how to resume.

Each test asks the real local Ray (no GPU) for something it can never place — a GPU —
with a timeout of a few seconds, through `stream_and_train` as the recipe calls it.
"""

from __future__ import annotations

import time

import pytest

from spo_ray.timeouts import TRAINER_START_ENV
from tests.conftest import compose
from tests.fault_report import record_fault

pytestmark = pytest.mark.fault

PROMPTS = [{"prompt_id": f"p{i}", "prompt": f"Say {i}"} for i in range(4)]


def _run(tmp_path, tiny_policy, overrides: list[str]) -> tuple[str, float]:
    from spo_ray.run_dir import RunDir
    from spo_ray.train import stream_and_train

    _, cfg = compose(["experiment=tiny", "rollout.num_samples=2", "rollout.max_new_tokens=4", "cluster.gpus_per_node=1", *overrides])
    start = time.monotonic()
    with pytest.raises(TimeoutError) as err:
        stream_and_train(cfg, RunDir(tmp_path / "run"), PROMPTS, tiny_policy, 1)
    return str(err.value), time.monotonic() - start


def test_a_stage_pool_that_cannot_start_times_out_naming_the_stage(ray_session, tiny_policy, tmp_path):
    # colocate: the stream is materialized by the driver before training (the GPU path)
    text, seconds = _run(
        tmp_path, tiny_policy, ["cluster.rollout.num_gpus=1", "cluster.colocate=true", "learner.persistent=false", "run.timeouts.actor_start_s=3"]
    )
    assert seconds < 60, f"the actor-start timeout of 3 s took {seconds:.0f} s"
    assert text.startswith("iteration 1: the rollout pool (RolloutStage × 1, 0.25 CPU + 1 GPU each)"), text
    assert "run.timeouts.actor_start_s=3s" in text and "asks for 1 GPU but the whole cluster has 0" in text
    assert "ray status" in text and "same run.dir" in text
    record_fault("rollout pool cannot be placed (asks for a GPU)", "actor start", False, 0, 0, None,
                 outcome=f"TimeoutError naming the pool after {seconds:.0f} s (run.timeouts.actor_start_s=3); resumable")


def test_learner_workers_that_cannot_start_time_out_naming_the_learner(ray_session, tiny_policy, tmp_path, monkeypatch):
    monkeypatch.setenv(TRAINER_START_ENV, "60")  # undone after the test: later trainers set their own
    text, seconds = _run(tmp_path, tiny_policy, ["cluster.learner.gpus_per_worker=1", "run.timeouts.trainer_start_s=3"])
    assert seconds < 90, f"the trainer-start timeout of 3 s took {seconds:.0f} s"
    assert text.startswith("iteration 1: the learner's Ray Train workers (RayTrainWorker × 1, 0.5 CPU + 1 GPU each)"), text
    assert "run.timeouts.trainer_start_s=3s" in text and "ray status" in text and "same run.dir" in text
    record_fault("learner workers cannot be placed (ask for a GPU)", "trainer start", False, 0, 0, None,
                 outcome=f"TimeoutError naming the learner after {seconds:.0f} s (run.timeouts.trainer_start_s=3); resumable")


def test_a_task_past_its_timeout_is_cancelled_and_named(ray_session):
    from spo_ray.timeouts import get_within

    @ray_session.remote(num_cpus=0)
    def slow(s: float) -> float:
        time.sleep(s)
        return s

    assert get_within(slow.remote(0.0), 60, "a quick task") == 0.0
    ref = slow.remote(120.0)
    start = time.time()
    with pytest.raises(TimeoutError, match=r"evaluation of iter_3 took longer than run.timeouts.eval_s=1s; .*same run.dir"):
        get_within(ref, 1, "evaluation of iter_3")
    assert time.time() - start < 30
    with pytest.raises((ray_session.exceptions.TaskCancelledError, ray_session.exceptions.WorkerCrashedError)):
        ray_session.get(ref, timeout=30)  # cancelled, not left running
