"""The meta-game of a tournament: policies as pure strategies, the win-rate matrix as payoffs.

W[i, j] is the judged rate at which policy i beats policy j (ties count ½), so W[i, i] = ½
and W[i, j] + W[j, i] = 1. Read as a symmetric zero-sum game with payoff A = W − ½ to the row
player (antisymmetric, value 0), it has:

- a Nash mixture x (a von Neumann winner of the preference game, the object SPPO approaches,
  Wu et al. 2024 §3): Σ_i x_i W[i, j] ≥ ½ for every policy j — no policy beats the mixture.
  Found by the linear program max v s.t. Σ_i x_i A[i, j] ≥ v ∀j, Σ x = 1, x ≥ 0;
- each policy's exploitability max_j W[j, i] − ½: how far its best opponent beats it
  (0 for a policy no one beats, ½ for one that loses every prompt to some policy);
- intransitive cycles: i beats j, j beats k and k beats i, each significantly (the lower end
  of the win rate's interval above ½) — preferences that no ranking, and so no
  Bradley–Terry model, can represent.

Pure numpy/scipy: no Ray, no I/O (spo_ray/tournament.py judges the policies and writes files).
"""

from __future__ import annotations

from itertools import permutations
from typing import Sequence

import numpy as np

ZERO = 1e-9  # mixture weights below this are LP round-off: set to 0


def check_win_rates(win_rate: Sequence[Sequence[float]]) -> np.ndarray:
    """W as a float array, or a ValueError: square, entries in [0, 1], ½ on the diagonal,
    W[i, j] + W[j, i] = 1."""
    w = np.asarray(win_rate, dtype=float)
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] == 0:
        raise ValueError(f"a win-rate matrix must be square and non-empty, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or w.min() < 0 or w.max() > 1:
        raise ValueError("win rates must be finite and in [0, 1]")
    if not np.allclose(np.diag(w), 0.5):
        raise ValueError(f"W[i, i] must be ½ (a policy against itself), got {np.diag(w).tolist()}")
    if not np.allclose(w + w.T, 1.0):
        raise ValueError("W[i, j] + W[j, i] must be 1 (both orders of one judged pair)")
    return w


def nash_mixture(win_rate: Sequence[Sequence[float]]) -> np.ndarray:
    """A maximin mixture x of the symmetric zero-sum game A = W − ½ (scipy's HiGHS LP).

    Variables (x_1 … x_n, v): minimize −v subject to v − Σ_i x_i A[i, j] ≤ 0 for each column
    j, Σ x = 1, x ≥ 0, v free. For an antisymmetric A the value v is 0. Where several mixtures
    are optimal (e.g. two policies that always tie) the LP returns one vertex of that set.
    """
    from scipy.optimize import linprog

    a = check_win_rates(win_rate) - 0.5
    n = a.shape[0]
    cost = np.zeros(n + 1)
    cost[-1] = -1.0
    a_ub = np.hstack([-a.T, np.ones((n, 1))])
    a_eq = np.hstack([np.ones((1, n)), np.zeros((1, 1))])
    bounds = [(0, None)] * n + [(None, None)]
    res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=[1.0], bounds=bounds, method="highs")
    if res.status != 0:
        raise RuntimeError(f"the Nash linear program failed: {res.message}")
    x = np.where(res.x[:n] < ZERO, 0.0, res.x[:n])
    return x / x.sum()


def exploitability(win_rate: Sequence[Sequence[float]]) -> np.ndarray:
    """Per policy i: max_j W[j, i] − ½, the margin by which its best opponent beats it (≥ 0:
    j = i gives ½)."""
    w = check_win_rates(win_rate)
    return w.max(axis=0) - 0.5


def mixture_exploitability(win_rate: Sequence[Sequence[float]], mixture: Sequence[float]) -> float:
    """max_j Σ_i x_i W[j, i] − ½: how far the best single policy beats the mixture x (≈ 0 for
    the Nash mixture)."""
    w = check_win_rates(win_rate)
    x = np.asarray(mixture, dtype=float)
    return float((w @ x).max() - 0.5)


def intransitive_cycles(win_rate_lower: Sequence[Sequence[float]]) -> list[tuple[int, int, int]]:
    """Triples (i, j, k) with i beating j, j beating k and k beating i, each significantly:
    the lower end of the win rate's interval, `win_rate_lower[a][b]`, above ½. Each cycle is
    listed once, starting from its smallest index; sorted."""
    lower = np.asarray(win_rate_lower, dtype=float)
    beats = lower > 0.5
    n = lower.shape[0]
    return sorted(
        (i, j, k)
        for i, j, k in permutations(range(n), 3)
        if i < j and i < k and beats[i, j] and beats[j, k] and beats[k, i]
    )
