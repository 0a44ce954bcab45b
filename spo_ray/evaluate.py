"""Win rate of π_t against π_0 on held-out prompts, judged in both orders.

Each held-out prompt gives one outcome for π_t: 1 (win), 0 (loss) or ½ (tie: the judge's
two-order logit sum is 0, or both answers are identical). The win rate is the mean
outcome with a normal-approximation 95 % interval, clipped to [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

from spo_ray.judge.base import Judge
from spo_ray.rollout.base import Engine, SamplingConfig

if TYPE_CHECKING:
    from spo_ray.config import Config


@dataclass(frozen=True)
class WinRate:
    win_rate: float
    win_rate_ci: tuple[float, float]
    ties: int
    n: int

    def as_dict(self) -> dict:
        d = asdict(self)
        d["win_rate_ci"] = list(self.win_rate_ci)
        return d


def win_rate(outcomes: Sequence[float], z: float = 1.959963984540054) -> WinRate:
    """Mean outcome and its 95 % interval: mean ± z·s/√n, s the sample standard deviation."""
    n = len(outcomes)
    if n == 0:
        raise ValueError("no outcomes to compute a win rate from")
    if any(o not in (0.0, 0.5, 1.0) for o in outcomes):
        raise ValueError("outcomes must be 0, 0.5 or 1")
    mean = sum(outcomes) / n
    var = sum((o - mean) ** 2 for o in outcomes) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    return WinRate(mean, (max(0.0, mean - half), min(1.0, mean + half)), sum(o == 0.5 for o in outcomes), n)


def judge_outcomes(judge: Judge, prompts: Sequence[str], answers: Sequence[str], baseline: Sequence[str]) -> list[float]:
    """Outcome of `answers` against `baseline` per prompt, both orders presented to the judge."""
    forward = judge.batch_pairwise_logits(prompts, [[a, b] for a, b in zip(answers, baseline)])
    backward = judge.batch_pairwise_logits(prompts, [[b, a] for a, b in zip(answers, baseline)])
    outcomes = []
    for a, b, m1, m2 in zip(answers, baseline, forward, backward):
        margin = float(m1[0, 1] - m1[1, 0] + m2[1, 0] - m2[0, 1])
        if a == b or margin == 0 or not math.isfinite(margin):
            outcomes.append(0.5)
        else:
            outcomes.append(1.0 if margin > 0 else 0.0)
    return outcomes


def generate_answers(engine: Engine, prompts: Sequence[str], sampling: SamplingConfig, batch_size: int) -> tuple[list[str], list[int]]:
    """One answer per prompt, in batches; returns texts and token counts."""
    texts, lengths = [], []
    for start in range(0, len(prompts), batch_size):
        for rollout in engine.generate(prompts[start : start + batch_size], sampling):
            texts.append(rollout.responses[0])
            lengths.append(rollout.num_tokens[0])
    return texts, lengths


def evaluate_policy(cfg: "Config", policy_path: str, held_out: list[dict], baseline: list[str] | None) -> dict:
    """Answers of the policy at `policy_path` on the held-out prompts and, given π_0's
    answers, the judged win rate: `win_rate`, `win_rate_ci`, `avg_length`, `ties`, `n`.

    Runs as one Ray task (resources from `cluster.evaluate`); plain Python otherwise.
    """
    from spo_ray.judge import build_judge
    from spo_ray.pipeline import judge_prompts, make_engine

    e = cfg.evaluate
    engine = make_engine(cfg, policy_path)
    sampling = SamplingConfig(
        num_samples=1,
        temperature=0.0 if e.greedy else e.temperature,
        top_p=1.0 if e.greedy else cfg.rollout.top_p,
        max_new_tokens=e.max_new_tokens,
        seed=cfg.run.seed,
    )
    prompts = [p["prompt"] for p in held_out]
    answers, lengths = generate_answers(engine, prompts, sampling, e.batch_size)
    result: dict = {"answers": answers, "lengths": lengths, "avg_length": sum(lengths) / len(lengths)}
    if baseline is None:
        return result
    judge = build_judge(cfg.judge)
    shown = judge_prompts(prompts, cfg.judge.prompt_format, engine.tokenizer)
    result.update(win_rate(judge_outcomes(judge, shown, answers, baseline)).as_dict())
    return result
