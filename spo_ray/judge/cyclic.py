"""An intransitive preference game over three response classes, and its rule judge.

A response's class is read from its first character (after the rollout's strip):

    0  "lower"  a lowercase ASCII letter
    1  "upper"  an uppercase ASCII letter
    2  "other"  anything else: a digit, punctuation, a non-ASCII character, or nothing

The game is a weighted rock–paper–scissors: lower beats upper, upper beats other, other
beats lower, with the probabilities `win_probs` = (p01, p12, p20), each in (½, 1).
P[i, j] = P(class i ≻ class j), P[i, i] = ½, P[j, i] = 1 − P[i, j]. No class is best, so
the von Neumann winner (the Nash equilibrium of the symmetric zero-sum game with payoff
A = P − ½) is a mixture. With margins m_ij = p_ij − ½ it is

    π* ∝ (m12, m20, m01)

(each class weighted by the margin of the edge it is not in: (Aπ*)_0 = m01 m20 − m20 m01
= 0, and likewise for 1 and 2), and P(y ≻ π*) = ½ for every y. A mixture π is
exploitable by

    exploitability(π) = max_y P(y ≻ π) − ½   (≥ 0, = 0 exactly at π*),

how much the best pure response beats it; the SPPO paper's theorem bounds this for the
average of the iterates π_1..π_T.

`CyclicJudge` returns M[i, j] = logit P[c_i, c_j] for two responses of classes c_i, c_j
(σ(M[i, j]) is the game's probability), so the pipeline ranks samples by the game.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

CLASS_NAMES = ("lower", "upper", "other")
"""The three classes, in index order."""


def response_class(response: str) -> int:
    """0 if `response` starts with a lowercase ASCII letter, 1 if uppercase, else 2."""
    first = response[:1]
    if first.isascii() and first.islower():
        return 0
    if first.isascii() and first.isupper():
        return 1
    return 2


def class_distribution(responses: Sequence[str]) -> list[float]:
    """The share of `responses` in each class (zeros if there are none)."""
    counts = [0, 0, 0]
    for response in responses:
        counts[response_class(response)] += 1
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


@dataclass(frozen=True)
class CyclicGame:
    """The weighted rock–paper–scissors P over the three classes (see the module doc)."""

    win_probs: tuple[float, float, float]
    """(P(lower ≻ upper), P(upper ≻ other), P(other ≻ lower)), each in (½, 1)."""

    def __post_init__(self) -> None:
        probs = tuple(float(p) for p in self.win_probs)
        if len(probs) != 3 or not all(0.5 < p < 1.0 for p in probs):
            raise ValueError(
                f"judge.cyclic.win_probs must be three probabilities in (0.5, 1) "
                f"(lower ≻ upper, upper ≻ other, other ≻ lower), got {list(self.win_probs)}"
            )
        object.__setattr__(self, "win_probs", probs)

    @property
    def matrix(self) -> list[list[float]]:
        """P[i][j] = P(class i ≻ class j)."""
        p01, p12, p20 = self.win_probs
        return [[0.5, p01, 1 - p20], [1 - p01, 0.5, p12], [p20, 1 - p12, 0.5]]

    def nash(self) -> list[float]:
        """π* ∝ (m12, m20, m01), the game's unique Nash equilibrium."""
        p01, p12, p20 = self.win_probs
        margins = [p12 - 0.5, p20 - 0.5, p01 - 0.5]
        return [m / sum(margins) for m in margins]

    def win_rates(self, dist: Sequence[float]) -> list[float]:
        """P(y ≻ π) for y in each class, against the mixture π = `dist`."""
        return [sum(p * q for p, q in zip(row, dist)) for row in self.matrix]

    def exploitability(self, dist: Sequence[float]) -> float:
        """max_y P(y ≻ π) − ½ for π = `dist` (a distribution over the classes)."""
        if len(dist) != 3 or abs(sum(dist) - 1.0) > 1e-6 or min(dist) < 0:
            raise ValueError(f"dist must be a distribution over 3 classes, got {list(dist)}")
        return max(self.win_rates(dist)) - 0.5


class CyclicJudge:
    """M[i, j] = logit P[c_i, c_j]: the game's probability, for the judge stage."""

    def __init__(self, win_probs: Sequence[float]) -> None:
        self.game = CyclicGame(tuple(win_probs))
        self._logits = torch.tensor(
            [[math.log(p / (1 - p)) for p in row] for row in self.game.matrix], dtype=torch.float64
        )

    def pairwise_logits(self, prompt: str, responses: Sequence[str]) -> torch.Tensor:
        classes = torch.tensor([response_class(r) for r in responses], dtype=torch.long)
        return self._logits[classes][:, classes].float()

    def batch_pairwise_logits(
        self, prompts: Sequence[str], responses: Sequence[Sequence[str]]
    ) -> list[torch.Tensor]:
        return [self.pairwise_logits(p, r) for p, r in zip(prompts, responses)]
