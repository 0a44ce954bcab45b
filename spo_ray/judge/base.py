"""The Judge protocol: pairwise logits for the K responses of one prompt.

A judge answers, for one prompt and its K responses, the K×K matrix M of pairwise
logits: M[i, j] is the logit that response i beats response j (diagonal 0). The
per-response score is PairRM's aggregate s_i = mean_j (M[i, j] − M[j, i]); the SPPO
win probabilities P[i, j] = σ(s_i − s_j) are computed from those scores in
`spo_ray.sppo`, not here.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch


def scores_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """s_i = (1/K) Σ_j (M[i, j] − M[j, i]) for a [..., K, K] logit matrix."""
    return (logits - logits.transpose(-1, -2)).mean(dim=-1)


@runtime_checkable
class Judge(Protocol):
    """What the judge stage and the evaluator need from a preference model."""

    def pairwise_logits(self, prompt: str, responses: Sequence[str]) -> torch.Tensor:
        """[K, K] float tensor, M[i, j] = logit that responses[i] beats responses[j]."""
        ...

    def batch_pairwise_logits(
        self, prompts: Sequence[str], responses: Sequence[Sequence[str]]
    ) -> list[torch.Tensor]:
        """One [K_n, K_n] matrix per prompt; equal to calling `pairwise_logits` per prompt."""
        ...
