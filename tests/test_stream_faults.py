"""Issue 6, item 1: a rollout or judge actor that dies mid-iteration loses no prompt.

The real stream of one iteration (the pipeline's rollout pool → judge pool, which the
learner reads) runs on the shared Ray with a fault armed: the n-th rollout or judge batch
kills its actor process (spo_ray/faults.py: exit code 17, no cleanup), or the test
SIGKILLs the live rollout actor from outside. Ray Data restarts the actor and retries its
batches (pipeline.STAGE_FAULT_TOLERANCE), and every prompt still comes out exactly once,
as a pair or a counted skip. The rollout engine is the real HFEngine paced to ≥ 0.5 s per
batch, so that a fault meets work still to do.

"Extra time" (the chaos table) is the faulted stream's wall time minus a clean stream's
of the same prompts in the same session: mostly the replacement actor's start.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import pytest

from spo_ray.faults import fired
from tests.conftest import compose
from tests.fault_report import record_fault

pytestmark = pytest.mark.fault

OVERRIDES = ["experiment=tiny", "rollout.num_samples=2", "rollout.max_new_tokens=8", "rollout.batch_size=2", "judge.batch_size=2"]
NUM_PROMPTS = 12  # 6 rollout batches, 6 judge batches
PACE_S = 0.5


@pytest.fixture(scope="module")
def prompts() -> list[dict]:
    from spo_ray.data.prompts import load_prompts

    return load_prompts("tiny_prompts", "builtin", "prompt", "prompt_id").rows[:NUM_PROMPTS]


def paced_engine(cfg, policy_path: str):
    """The real HFEngine, taking at least PACE_S per rollout batch (a tiny model generates
    in ~0.1 s, so without it a stream could finish before a fault has anything to hit)."""
    from spo_ray.rollout.factory import make_engine

    engine = make_engine(cfg, policy_path)
    generate = engine.generate

    def paced(prompts, sampling):
        time.sleep(PACE_S)
        return generate(prompts, sampling)

    engine.generate = paced
    return engine


def _stream(prompts: list[dict], policy: str) -> tuple[list[dict], float]:
    """One iteration's pair stream (the pipeline's rollout and judge pools), consumed here;
    its rows and wall time."""
    from spo_ray.pipeline import judge_stream, rollout_stream
    from spo_ray.timeouts import apply_stream_timeouts

    _, cfg = compose(OVERRIDES)
    rollouts = rollout_stream(cfg, prompts, policy, 1, engine_factory=paced_engine)
    pairs = apply_stream_timeouts(judge_stream(cfg, rollouts, policy, 1), cfg)
    start = time.monotonic()
    rows = list(pairs.iter_rows())
    return rows, time.monotonic() - start


@pytest.fixture(scope="module")
def clean_s(ray_session, tiny_policy, prompts) -> float:
    """Wall time of the same stream without a fault (the baseline of "extra time")."""
    rows, seconds = _stream(prompts, tiny_policy)
    assert sorted(r["prompt_id"] for r in rows) == sorted(p["prompt_id"] for p in prompts)
    return seconds


def _check_every_prompt_once(rows: list[dict], prompts: list[dict]) -> tuple[int, int]:
    """Prompts lost and repeated; asserts none of either (a pair or a counted skip each)."""
    seen = Counter(r["prompt_id"] for r in rows)
    wanted = {p["prompt_id"] for p in prompts}
    lost = len(wanted - set(seen))
    repeated = sum(n - 1 for n in seen.values() if n > 1) + sum(1 for pid in seen if pid not in wanted)
    assert (lost, repeated) == (0, 0), f"lost {wanted - set(seen)}, repeated {[p for p, n in seen.items() if n > 1]}"
    for r in rows:
        assert len(r["responses"]) == 2
        if not r["skip_reason"]:
            assert r["chosen"] in r["responses"] and r["rejected"] in r["responses"]
    return lost, repeated


@pytest.mark.parametrize(
    "spec, phase",
    [("rollout_batch@3", "generation (3rd rollout batch)"), ("judge_batch@3", "judging (3rd judge batch)")],
)
def test_a_stage_actor_that_exits_mid_iteration_is_replaced_and_loses_no_prompt(
    arm_fault, tiny_policy, prompts, clean_s, spec, phase
):
    site = spec.split("@")[0]
    with arm_fault(spec) as folder:
        rows, seconds = _stream(prompts, tiny_policy)
        assert fired(site, folder), f"{spec} never fired: the test proves nothing"
    lost, repeated = _check_every_prompt_once(rows, prompts)
    stage = "rollout" if site == "rollout_batch" else "judge"
    record_fault(f"{stage} actor process exits ({spec})", phase, True, lost, repeated, seconds - clean_s,
                 faulted_s=round(seconds, 1), clean_s=round(clean_s, 1))


def _stage_actors(name: str) -> dict:
    """The live session's actors whose class is the Ray Data pool worker of `name`."""
    import ray

    # ray.util.state needs the dashboard, which the test session does not start; this
    # reads the same GCS actor table through the connected driver.
    table = ray._private.state.actors()
    return {aid: a for aid, a in table.items() if name in a["ActorClassName"]}


def test_sigkill_of_the_live_rollout_actor_is_survived(arm_fault, tiny_policy, prompts, clean_s):
    """A real crash from outside (SIGKILL of the actor's process, as the OOM killer or a
    lost node would do) once two of the six rollout batches are done; the actor is found
    through the GCS actor table."""
    killed: list[tuple[int, int]] = []

    def kill_after_two_batches(folder) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            count = folder / "rollout_batch.count"
            done = int(count.read_text() or 0) if count.exists() else 0
            alive = [a for a in _stage_actors("RolloutStage").values() if a["State"] == "ALIVE" and a["Pid"]]
            if done >= 2 and alive:
                os.kill(alive[0]["Pid"], signal.SIGKILL)
                killed.append((alive[0]["Pid"], done))
                return
            time.sleep(0.1)

    before = set(_stage_actors("RolloutStage"))
    # An armed site that never fires (n too large) still counts arrivals: the kill's clock.
    with arm_fault("rollout_batch@1000000") as folder:
        killer = threading.Thread(target=kill_after_two_batches, args=(folder,), daemon=True)
        killer.start()
        rows, seconds = _stream(prompts, tiny_policy)
        killer.join(timeout=5)
    assert killed and killed[0][1] < NUM_PROMPTS // 2, f"the kill came too late to hit work: {killed}"
    restarted = [a for aid, a in _stage_actors("RolloutStage").items() if aid not in before and a["NumRestarts"] >= 1]
    assert restarted, "the killed rollout actor was not restarted by Ray"
    lost, repeated = _check_every_prompt_once(rows, prompts)
    record_fault("rollout actor SIGKILLed from outside", "generation (after 2 of 6 batches)", True, lost, repeated,
                 seconds - clean_s, faulted_s=round(seconds, 1), clean_s=round(clean_s, 1))


@pytest.fixture(scope="module")
def run_actors(ray_session, tiny_policy):
    """The run's persistent rollout engines (paced, as above) and judges: on them the
    stream's stages are forwarding tasks (spo_ray.pipeline.run_stage), not actor pools."""
    from spo_ray.judge.pool import JudgePool
    from spo_ray.rollout.engines import RolloutEngines

    _, cfg = compose(OVERRIDES)
    engines, judges = RolloutEngines(cfg, tiny_policy, paced_engine), JudgePool(cfg)
    engines.wait_started(1, cfg)
    judges.wait_started(1, cfg)
    yield engines, judges
    engines.shutdown()
    judges.shutdown()


def _stream_on(run_actors, prompts: list[dict], policy: str) -> tuple[list[dict], float]:
    from spo_ray.pipeline import judge_stream, rollout_stream
    from spo_ray.timeouts import apply_stream_timeouts

    engines, judges = run_actors
    _, cfg = compose(OVERRIDES)
    rollouts = rollout_stream(cfg, prompts, policy, 1, engines=engines)
    pairs = apply_stream_timeouts(judge_stream(cfg, rollouts, policy, 1, judges=judges), cfg)
    start = time.monotonic()
    rows = list(pairs.iter_rows())
    return rows, time.monotonic() - start


@pytest.mark.parametrize(
    "spec, phase",
    [("rollout_batch@3", "generation (3rd rollout batch)"), ("judge_batch@3", "judging (3rd judge batch)")],
)
def test_a_forwarding_task_that_exits_mid_iteration_is_retried_and_loses_no_prompt(
    arm_fault, run_actors, tiny_policy, prompts, spec, phase
):
    """On the run's engines and judges the stages are Ray tasks: the process of the one that
    dies is gone, Ray Data runs the batch again in another (pipeline.TASK_FAULT_TOLERANCE),
    and the stream starts no stage actor at all."""
    site = spec.split("@")[0]
    before = set(_stage_actors("RolloutStage")) | set(_stage_actors("JudgeStage"))
    clean_rows, clean_s = _stream_on(run_actors, prompts, tiny_policy)
    _check_every_prompt_once(clean_rows, prompts)
    with arm_fault(spec) as folder:
        rows, seconds = _stream_on(run_actors, prompts, tiny_policy)
        assert fired(site, folder), f"{spec} never fired: the test proves nothing"
    assert set(_stage_actors("RolloutStage")) | set(_stage_actors("JudgeStage")) == before  # tasks, no pool actors
    lost, repeated = _check_every_prompt_once(rows, prompts)
    pairs = lambda rs: sorted((r["prompt_id"], r["responses"], r["chosen"], r["rejected"], r["skip_reason"]) for r in rs)  # noqa: E731
    assert pairs(rows) == pairs(clean_rows)  # the retried batch gave the same pairs (NaN fields left out)
    stage = "rollout" if site == "rollout_batch" else "judge"
    record_fault(f"{stage} forwarding task's process exits, on the run's engines and judges ({spec})", phase, True,
                 lost, repeated, seconds - clean_s, faulted_s=round(seconds, 1), clean_s=round(clean_s, 1))
