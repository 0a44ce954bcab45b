"""The cyclic game played on a tabular policy over its three classes (see benchmarks/nash.py).

Two kinds of update turn π_t into π_{t+1}:

- `mw_update`: the update SPPO's objective is derived from (paper, eq. 3.4),
  π_{t+1}(y) ∝ π_t(y) exp(η P(y ≻ π_t)), with the exact win rates of the game.
- `sampled_update`: what the pipeline does, at the level of classes. For each of
  `prompts` prompts, K classes are drawn from π_t; the real `CyclicJudge` gives their
  pairwise logits, `scores_from_logits` the scores, `spo_ray.sppo.select_pair` the chosen
  and rejected class with p̂_w, p̂_l, and the policy's class logits are trained with Adam
  on `spo_ray.sppo.preference_loss` (sppo, dpo or ipo) against the frozen π_t. So this
  path runs every function of spo_ray/sppo.py the learner uses on a policy small enough
  to follow exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from spo_ray.judge import scores_from_logits
from spo_ray.judge.cyclic import CyclicGame, CyclicJudge
from spo_ray.sppo import preference_loss, select_pair

# One response of each class, for asking the real judge about classes.
CLASS_EXAMPLES = ("a", "A", "1")


def mw_update(game: CyclicGame, dist: Sequence[float], eta: float) -> list[float]:
    """π_{t+1}(y) ∝ π_t(y) exp(η P(y ≻ π_t)) over the classes (exact win rates)."""
    weights = [p * math.exp(eta * w) for p, w in zip(dist, game.win_rates(dist))]
    return [w / sum(weights) for w in weights]


@dataclass(frozen=True)
class SampledSettings:
    """The pipeline's knobs, at the level of classes."""

    loss: str = "sppo"
    beta: float = 0.1
    prompts: int = 56
    num_samples: int = 4
    lr: float = 0.05
    epochs: int = 2
    batch: int = 8


@dataclass(frozen=True)
class ClassPair:
    """One prompt's chosen and rejected class and p̂_w, p̂_l (from `select_pair`)."""

    chosen: int
    rejected: int
    win: float
    lose: float


def sample_pairs(
    judge: CyclicJudge, dist: Sequence[float], settings: SampledSettings, gen: torch.Generator
) -> list[ClassPair]:
    """K classes per prompt from `dist`, judged and reduced to a pair as in the pipeline;
    prompts whose samples all tie (one class only) are skipped, as `select_pair` says."""
    probs = torch.tensor(dist, dtype=torch.float64)
    draws = torch.multinomial(probs, settings.prompts * settings.num_samples, replacement=True, generator=gen)
    pairs = []
    for row in draws.view(settings.prompts, settings.num_samples).tolist():
        logits = judge.pairwise_logits("", [CLASS_EXAMPLES[c] for c in row])
        choice = select_pair(scores_from_logits(logits))
        if choice is not None:
            pairs.append(
                ClassPair(row[choice.chosen], row[choice.rejected], choice.chosen_probs_win, choice.chosen_probs_lose)
            )
    return pairs


def train_on_pairs(
    ref_logits: torch.Tensor, pairs: list[ClassPair], settings: SampledSettings, gen: torch.Generator
) -> torch.Tensor:
    """Class logits after `epochs` passes of Adam over `pairs` on `preference_loss`,
    the reference fixed at `ref_logits` (π_t), the mean loss per mini-batch."""
    theta = ref_logits.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=settings.lr)
    ref_logps = torch.log_softmax(ref_logits, dim=-1)
    for _ in range(settings.epochs):
        order = torch.randperm(len(pairs), generator=gen).tolist()
        for start in range(0, len(order), settings.batch):
            batch = [pairs[i] for i in order[start : start + settings.batch]]
            w = torch.tensor([p.chosen for p in batch])
            l = torch.tensor([p.rejected for p in batch])
            logps = torch.log_softmax(theta, dim=-1)
            loss = preference_loss(
                logps[w], logps[l], ref_logps[w], ref_logps[l],
                loss_type=settings.loss, beta=settings.beta,
                chosen_probs_win=torch.tensor([p.win for p in batch]),
                chosen_probs_lose=torch.tensor([p.lose for p in batch]),
            ).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return theta.detach()


def play_sampled(
    judge: CyclicJudge, start: Sequence[float], iterations: int, settings: SampledSettings, seed: int = 0
) -> list[list[float]]:
    """π_0 = `start`, then `iterations` sampled updates: [π_0, π_1, ..., π_T]."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.log(torch.tensor(start, dtype=torch.float32))
    dists = [list(start)]
    for _ in range(iterations):
        pairs = sample_pairs(judge, dists[-1], settings, gen)
        logits = train_on_pairs(logits, pairs, settings, gen)
        dists.append(torch.softmax(logits, dim=-1).tolist())
    return dists


def play_mw(game: CyclicGame, start: Sequence[float], iterations: int, eta: float) -> list[list[float]]:
    """π_0 = `start`, then `iterations` exact updates: [π_0, π_1, ..., π_T]."""
    dists = [list(start)]
    for _ in range(iterations):
        dists.append(mw_update(game, dists[-1], eta))
    return dists


def exploitability_curves(game: CyclicGame, dists: list[list[float]]) -> tuple[list[float], list[float]]:
    """(exploitability of π_t, of the average of π_1..π_t) for t = 0..T; at t = 0 both
    are π_0's own (there is no iterate to average yet)."""
    last = [game.exploitability(d) for d in dists]
    avg = [last[0]]
    for t in range(1, len(dists)):
        mean = [sum(d[c] for d in dists[1 : t + 1]) / t for c in range(3)]
        avg.append(game.exploitability(mean))
    return last, avg
