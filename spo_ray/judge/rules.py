"""Deterministic rule judges: a learnable signal for tests and the `tiny` preset."""

from __future__ import annotations

from typing import Sequence

import torch


class _RuleJudge:
    """M[i, j] = (f(y_i) − f(y_j)) / temperature for a per-response feature f."""

    temperature: float = 1.0

    def feature(self, response: str) -> float:
        raise NotImplementedError

    def pairwise_logits(self, prompt: str, responses: Sequence[str]) -> torch.Tensor:
        f = torch.tensor([self.feature(r) for r in responses], dtype=torch.float64)
        return ((f[:, None] - f[None, :]) / self.temperature).float()

    def batch_pairwise_logits(
        self, prompts: Sequence[str], responses: Sequence[Sequence[str]]
    ) -> list[torch.Tensor]:
        return [self.pairwise_logits(p, r) for p, r in zip(prompts, responses)]


class KeywordJudge(_RuleJudge):
    """Prefers responses in which `target` makes up a larger share of the characters."""

    def __init__(self, target: str, temperature: float) -> None:
        if not target:
            raise ValueError("judge.keyword.target must be a non-empty string")
        if temperature <= 0:
            raise ValueError(f"judge.keyword.temperature must be > 0, got {temperature}")
        self.target = target
        self.temperature = temperature

    def feature(self, response: str) -> float:
        if not response:
            return 0.0
        return response.count(self.target) * len(self.target) / len(response)


class LengthJudge(_RuleJudge):
    """Prefers longer responses (one logit per character of difference)."""

    def feature(self, response: str) -> float:
        return float(len(response))
