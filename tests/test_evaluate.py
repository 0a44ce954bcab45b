import math

import pytest
import torch

from spo_ray.evaluate import judge_outcomes, win_rate
from spo_ray.judge.rules import LengthJudge


def test_win_rate_and_ci_by_hand():
    # outcomes 1, 1, 0.5, 0: mean 0.625; deviations .375,.375,-.125,-.625 → squares sum 0.6875
    # sample variance 0.6875/3 = 0.229167; s.e. = sqrt(0.229167/4) = 0.239357; ±1.96·s.e. = 0.469131
    r = win_rate([1, 1, 0.5, 0])
    assert r.win_rate == 0.625 and r.ties == 1 and r.n == 4
    assert r.win_rate_ci[0] == pytest.approx(0.625 - 0.469131, abs=1e-5)
    assert r.win_rate_ci[1] == 1.0  # 1.094 clipped
    d = r.as_dict()
    assert set(d) == {"win_rate", "win_rate_ci", "ties", "n"} and isinstance(d["win_rate_ci"], list)


def test_win_rate_all_ties_has_zero_width():
    r = win_rate([0.5] * 10)
    assert r.win_rate == 0.5 and r.win_rate_ci == (0.5, 0.5) and r.ties == 10


def test_win_rate_rejects_bad_input():
    with pytest.raises(ValueError):
        win_rate([])
    with pytest.raises(ValueError):
        win_rate([0.3])


class _FirstSlotBiased(LengthJudge):
    """A judge that adds +5 to whatever is shown first: both orders must cancel it."""

    def pairwise_logits(self, prompt, responses):
        m = super().pairwise_logits(prompt, responses)
        m[0, 1] += 5.0
        return m


def test_outcomes_use_both_orders_and_identical_answers_tie():
    outcomes = judge_outcomes(_FirstSlotBiased(), ["p"] * 4, ["long", "s", "same", "ab"], ["s", "long", "same", "cd"])
    assert outcomes == [1.0, 0.0, 0.5, 0.5]


def test_nan_judgement_is_a_tie():
    class NaNJudge(LengthJudge):
        def pairwise_logits(self, prompt, responses):
            return torch.full((2, 2), math.nan)

    assert judge_outcomes(NaNJudge(), ["p"], ["a"], ["b"]) == [0.5]
