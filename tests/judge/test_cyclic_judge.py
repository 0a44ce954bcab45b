"""The cyclic judge and its game (spo_ray/judge/cyclic.py), against hand-computed values.

The game throughout: win_probs (0.6, 0.9, 0.7), i.e. P(lower ≻ upper) = 0.6,
P(upper ≻ other) = 0.9, P(other ≻ lower) = 0.7; margins m01 = 0.1, m12 = 0.4, m20 = 0.2.
"""

import math

import pytest
import torch

from spo_ray.judge import Judge, build_judge, scores_from_logits
from spo_ray.judge.cyclic import CyclicGame, CyclicJudge, class_distribution, response_class
from spo_ray.sppo import select_pair

WIN_PROBS = (0.6, 0.9, 0.7)


def test_response_classes():
    assert [response_class(r) for r in ["abc", "zZ", "Abc", "Q", "1a", "?", "", "éa", "Éa"]] == [
        0, 0, 1, 1, 2, 2, 2, 2, 2,
    ]
    assert class_distribution(["a", "b", "C", "!"]) == [0.5, 0.25, 0.25]
    assert class_distribution([]) == [0.0, 0.0, 0.0]


def test_nash_by_hand():
    game = CyclicGame(WIN_PROBS)
    # π* ∝ (m12, m20, m01) = (0.4, 0.2, 0.1) → (4/7, 2/7, 1/7)
    assert game.nash() == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    # Every class wins exactly half against π*: lower: 0.5·4/7 + 0.6·2/7 + 0.3·1/7 = 3.5/7
    assert game.win_rates(game.nash()) == pytest.approx([0.5, 0.5, 0.5])
    assert game.exploitability(game.nash()) == pytest.approx(0.0, abs=1e-12)


def test_exploitability_by_hand():
    game = CyclicGame(WIN_PROBS)
    # Uniform: lower (0.5+0.6+0.3)/3 = 0.4667, upper (0.4+0.5+0.9)/3 = 0.6, other (0.7+0.1+0.5)/3
    assert game.win_rates([1 / 3] * 3) == pytest.approx([1.4 / 3, 0.6, 1.3 / 3])
    assert game.exploitability([1 / 3] * 3) == pytest.approx(0.1)
    # All lowercase: "other" beats it with 0.7
    assert game.exploitability([1.0, 0.0, 0.0]) == pytest.approx(0.2)
    # All uppercase: lower beats it with 0.6; all other: upper beats it with 0.9
    assert game.exploitability([0.0, 1.0, 0.0]) == pytest.approx(0.1)
    assert game.exploitability([0.0, 0.0, 1.0]) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="distribution"):
        game.exploitability([0.5, 0.5, 0.5])


@pytest.mark.parametrize("bad", [(0.6, 0.9), (0.4, 0.9, 0.7), (0.6, 1.0, 0.7), (0.5, 0.9, 0.7)])
def test_bad_win_probs(bad):
    with pytest.raises(ValueError, match="win_probs"):
        CyclicGame(bad)


def test_judge_logits_by_hand():
    judge = CyclicJudge(WIN_PROBS)
    assert isinstance(judge, Judge)
    m = judge.pairwise_logits("p", ["a", "B", "?", "c"])
    lg = lambda p: math.log(p / (1 - p))  # noqa: E731
    expected = torch.tensor(
        [
            [0, lg(0.6), lg(0.3), 0],
            [lg(0.4), 0, lg(0.9), lg(0.4)],
            [lg(0.7), lg(0.1), 0, lg(0.7)],
            [0, lg(0.6), lg(0.3), 0],
        ]
    )
    assert torch.allclose(m, expected, atol=1e-6)
    assert torch.allclose(m, -m.T)
    assert torch.allclose(torch.sigmoid(m[0, 1]), torch.tensor(0.6))
    assert [t.shape for t in judge.batch_pairwise_logits(["x", "y"], [["a"], ["a", "1"]])] == [(1, 1), (2, 2)]


def test_pipeline_reduction_of_one_pair():
    """K = 2, a lowercase and an uppercase sample: M[0,1] = L = ln 1.5, so the scores are
    s = (L, −L), P[0,1] = σ(2L) = 2.25/3.25 and p̂ = ((½ + 9/13)/2, (½ + 4/13)/2)."""
    logits = CyclicJudge(WIN_PROBS).pairwise_logits("p", ["a", "B"])
    scores = scores_from_logits(logits)
    assert scores.tolist() == pytest.approx([math.log(1.5), -math.log(1.5)], abs=1e-6)
    pair = select_pair(scores)
    assert (pair.chosen, pair.rejected) == (0, 1)
    assert pair.chosen_probs == pytest.approx(9 / 13, abs=1e-6)
    assert pair.chosen_probs_win == pytest.approx((0.5 + 9 / 13) / 2, abs=1e-6)
    assert pair.chosen_probs_lose == pytest.approx((0.5 + 4 / 13) / 2, abs=1e-6)
    assert select_pair(scores_from_logits(CyclicJudge(WIN_PROBS).pairwise_logits("p", ["a", "b"]))) is None


def test_build_from_config():
    from tests.conftest import compose

    _, cfg = compose(["experiment=tiny", "judge=cyclic"])
    judge = build_judge(cfg.judge)
    assert isinstance(judge, CyclicJudge) and judge.game.win_probs == WIN_PROBS
    with pytest.raises(ValueError, match="win_probs"):
        compose(["experiment=tiny", "judge=cyclic", "judge.cyclic.win_probs=[0.6,0.4,0.7]"])
