"""The run's persistent judges (spo_ray/judge/pool.py): loaded once, used by every stream,
evaluation and tournament, through clients that behave as the judge itself would, and
surviving the loss of a judge actor (Ray restarts it and retries the call)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from spo_ray.judge.pool import JudgePool
from tests.conftest import compose
from tests.test_reference_stream import ThreeAnswers, letter_judge

PROMPTS = [f"q{n}" for n in range(4)]
RESPONSES = [["aaaa", "abab", "bbbb"], ["ab", "b", "aab"], ["c", "a", "b"], ["abc", "cba", "aa"]]
REFERENCES = {"q0": "aaaaaa", "q1": "bbbbbb", "q2": "cccc", "q3": "abab"}


def _cfg(*overrides):
    return compose(["experiment=tiny", "judge=reference", "rollout.num_samples=3", *overrides])[1]


def _direct_logits():
    judge = letter_judge()
    judge.set_references(REFERENCES)
    return judge.batch_pairwise_logits(PROMPTS, RESPONSES)


class PidJudge:
    """The letter judge, answering also which process it runs in (for the restart test)."""

    needs_references = True

    def __init__(self, cfg=None, device="cpu"):
        self.inner = letter_judge()

    def set_references(self, references):
        self.inner.set_references(references)

    def batch_pairwise_logits(self, prompts, responses):
        return self.inner.batch_pairwise_logits(prompts, responses) + [torch.tensor(float(os.getpid()))]


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_client_gives_the_judges_own_logits_with_each_prompts_reference(ray_session):
    pool = JudgePool(_cfg(), judge_factory=letter_judge)
    try:
        pool.wait_started(0, _cfg())
        client = pool.clients()()
        assert client.needs_references  # the reference judge's flag reaches the client
        client.set_references(REFERENCES)
        got = client.batch_pairwise_logits(PROMPTS, RESPONSES)
        want = _direct_logits()
        assert len(got) == len(want) and all(torch.allclose(g, w) for g, w in zip(got, want))
        # Only a batch's own references travel: a call on two prompts judges them as the judge would.
        assert torch.allclose(client.pairwise_logits("q1", RESPONSES[1]), want[1])
        # A prompt the client has no reference for reaches the judge as None: the judge's own error.
        with pytest.raises(Exception, match="reference answers are missing"):
            client.batch_pairwise_logits(["unknown"], [["a", "b"]])
    finally:
        pool.shutdown()


def test_a_killed_judge_actor_is_restarted_and_the_call_retried(ray_session):
    pool = JudgePool(_cfg(), judge_factory=PidJudge)
    try:
        pool.wait_started(0, _cfg())
        client = pool.clients()()
        client.set_references(REFERENCES)
        *first, pid = client.batch_pairwise_logits(PROMPTS, RESPONSES)
        os.kill(int(pid), signal.SIGKILL)  # the judge's process dies, as in a crash: Ray restarts the actor
        deadline = time.monotonic() + 60
        while _alive(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        *again, new_pid = client.batch_pairwise_logits(PROMPTS, RESPONSES)
        assert int(new_pid) != int(pid)  # a new process answered ...
        assert all(torch.equal(a, b) for a, b in zip(first, again))  # ... with the same logits
    finally:
        pool.shutdown()


def test_the_stream_on_the_pool_selects_the_pairs_its_own_judges_would(ray_session):
    from spo_ray.pipeline import judge_stream, rollout_stream

    cfg = _cfg("rollout.batch_size=2", "judge.batch_size=2")
    prompts = [{"prompt_id": f"p{n}", "prompt": f"q{n}", "reference": "a" * 6 if n % 2 else "b" * 6} for n in range(6)]
    own = judge_stream(cfg, rollout_stream(cfg, prompts, "unused", 1, engine_factory=ThreeAnswers), None, 1, judge_factory=letter_judge)
    pool = JudgePool(cfg, judge_factory=letter_judge)
    try:
        pool.wait_started(1, cfg)
        pooled = judge_stream(cfg, rollout_stream(cfg, prompts, "unused", 1, engine_factory=ThreeAnswers), None, 1, judges=pool)
        key = lambda r: r["prompt_id"]  # noqa: E731
        assert sorted(pooled.take_all(), key=key) == sorted(own.take_all(), key=key)
    finally:
        pool.shutdown()


def test_a_judge_pool_that_cannot_be_placed_names_itself(ray_session):
    cfg = _cfg("cluster.gpus_per_node=1", "cluster.judge.num_gpus=1", "run.timeouts.actor_start_s=3")  # the test Ray has no GPU
    pool = JudgePool(cfg, judge_factory=letter_judge)
    with pytest.raises(TimeoutError, match=r"the judge pool \(JudgeActor × 1, 0.25 CPU \+ 1 GPU each\) did not start"):
        pool.wait_started(0, cfg)
