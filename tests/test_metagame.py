"""The meta-game maths on hand-made win-rate matrices (values derived by hand below)."""

from __future__ import annotations

import numpy as np
import pytest

from spo_ray.metagame import (
    check_win_rates,
    exploitability,
    intransitive_cycles,
    mixture_exploitability,
    nash_mixture,
)

# Rock–paper–scissors: 0 beats 1, 1 beats 2, 2 beats 0, always.
RPS = [[0.5, 1.0, 0.0], [0.0, 0.5, 1.0], [1.0, 0.0, 0.5]]


def test_rock_paper_scissors_nash_is_uniform_and_every_pure_policy_is_exploitable():
    np.testing.assert_allclose(nash_mixture(RPS), [1 / 3, 1 / 3, 1 / 3], atol=1e-9)
    # Each policy's best opponent beats it on every prompt: 1 − ½.
    np.testing.assert_allclose(exploitability(RPS), [0.5, 0.5, 0.5])
    # Against the uniform mixture every policy scores (½ + 1 + 0)/3 = ½: nothing beats it.
    assert mixture_exploitability(RPS, [1 / 3] * 3) == pytest.approx(0.0, abs=1e-12)
    # A pure strategy is beaten by its counter: max_j W[j, 0] = 1.
    assert mixture_exploitability(RPS, [1, 0, 0]) == pytest.approx(0.5)


def test_weighted_rock_paper_scissors_has_the_kernel_mixture():
    # A = W − ½ with A[0,1] = a, A[1,2] = c, A[2,0] = b. A skew-symmetric 3×3 matrix has
    # kernel (c, b, a): row 0 of A·(c, b, a) is a·b − b·a = 0, likewise the others. With
    # a = .3, b = .1, c = .2: x = (.2, .1, .3)/.6 = (1/3, 1/6, 1/2), not uniform.
    a, b, c = 0.3, 0.1, 0.2
    w = [[0.5, 0.5 + a, 0.5 - b], [0.5 - a, 0.5, 0.5 + c], [0.5 + b, 0.5 - c, 0.5]]
    np.testing.assert_allclose(nash_mixture(w), [1 / 3, 1 / 6, 1 / 2], atol=1e-9)
    # exploitability: columns' maxima − ½ = (b, a, c)
    np.testing.assert_allclose(exploitability(w), [0.1, 0.3, 0.2])


def test_transitive_game_puts_all_weight_on_the_best_policy():
    w = [[0.5, 0.7, 0.9], [0.3, 0.5, 0.6], [0.1, 0.4, 0.5]]
    np.testing.assert_allclose(nash_mixture(w), [1, 0, 0], atol=1e-9)
    # column maxima: ½ (nobody beats 0), .7 (0 beats 1), .9 (0 beats 2)
    np.testing.assert_allclose(exploitability(w), [0.0, 0.2, 0.4])
    assert intransitive_cycles(np.asarray(w)) == []


def test_a_dominated_policy_gets_weight_zero():
    # RPS plus policy 3, which loses 0.6 : 0.4 to each of the others.
    w = np.full((4, 4), 0.5)
    w[:3, :3] = RPS
    w[:3, 3], w[3, :3] = 0.6, 0.4
    x = nash_mixture(w)
    assert x[3] == 0.0
    np.testing.assert_allclose(x, [1 / 3, 1 / 3, 1 / 3, 0], atol=1e-9)
    np.testing.assert_allclose(exploitability(w), [0.5, 0.5, 0.5, 0.1])


def test_cycles_need_every_edge_significant():
    lower = np.array(RPS) - 0.05  # interval lower ends: the wins' are .95 > ½
    assert intransitive_cycles(lower) == [(0, 1, 2)]
    lower[1, 2] = 0.49  # 1 beats 2, but not significantly: no cycle
    assert intransitive_cycles(lower) == []
    # Two cycles among four policies, each listed once from its smallest index:
    # 0→1→2→0 and 0→3→2→0 (3 beats 2, 0 beats 3).
    lower = np.full((4, 4), 0.3)
    for i, j in [(0, 1), (1, 2), (2, 0), (0, 3), (3, 2)]:
        lower[i, j] = 0.6
    assert intransitive_cycles(lower) == [(0, 1, 2), (0, 3, 2)]


@pytest.mark.parametrize(
    "bad, message",
    [
        ([[0.5, 0.7], [0.7, 0.5]], "must be 1"),
        ([[0.4, 0.5], [0.5, 0.5]], "must be ½"),
        ([[0.5, 1.2], [-0.2, 0.5]], "in \\[0, 1\\]"),
        ([[0.5, 0.5]], "square"),
    ],
)
def test_bad_matrices_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        check_win_rates(bad)
