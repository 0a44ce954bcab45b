"""Win rate of π_t against π_0 on held-out prompts, judged in both orders.

Each held-out prompt gives one outcome for π_t: 1 (win), 0 (loss) or ½ (tie: the judge's
two-order margin is 0, or both answers are identical), or none at all when the judge's
margin is not finite (NaN/inf): such a prompt is counted as `judge_nan` and left out of
the win rate rather than passed off as a tie.

The win rate is the mean outcome, (wins + ties/2) / n over the n judged prompts, with a
95 % Wilson score interval on that tie-adjusted proportion (see `win_rate`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from spo_ray.judge.base import Judge
from spo_ray.rollout.base import Engine, Prompt, SamplingConfig

if TYPE_CHECKING:
    from spo_ray.config import Config, JudgeConfig

log = logging.getLogger(__name__)

Z_95 = 1.959963984540054  # the standard normal's 97.5 % quantile


@dataclass(frozen=True)
class WinRate:
    """`n` = wins + ties + losses, the judged prompts; `judge_nan` prompts are not in it."""

    win_rate: float
    win_rate_ci: tuple[float, float]
    wins: int
    ties: int
    losses: int
    judge_nan: int
    n: int

    def as_dict(self) -> dict:
        d = asdict(self)
        d["win_rate_ci"] = list(self.win_rate_ci)
        return d


def wilson_interval(p: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion p observed over n trials:

        (p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n)

    Unlike p ± z·√(p(1−p)/n) (Wald) it stays inside [0, 1] and keeps a non-zero width
    when p is 0 or 1, and it covers close to 95 % at the n = 16–200 used here."""
    if n <= 0:
        raise ValueError(f"a Wilson interval needs n ≥ 1 trials, got n={n}")
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def win_rate(outcomes: Sequence[Optional[float]], z: float = Z_95) -> WinRate:
    """Win rate and its 95 % interval from per-prompt outcomes (1, ½, 0, or None for a
    non-finite judgement, which is counted in `judge_nan` and left out).

    Ties count ½: the win rate is p = (wins + ties/2) / n with n the judged prompts, and the
    interval is Wilson's on that p with the same n. This treats the tie-adjusted proportion
    as if it came from n win/loss trials; a tie has less variance (0 around ½) than a win or
    a loss, so with ties the interval is somewhat conservative (wider), never narrower.
    """
    if not outcomes:
        raise ValueError("no outcomes to compute a win rate from")
    if any(o not in (0.0, 0.5, 1.0, None) for o in outcomes):
        raise ValueError(f"outcomes must be 0, 0.5, 1 or None (non-finite judgement), got {sorted(set(outcomes), key=str)}")
    wins, ties, losses = (sum(o == v for o in outcomes) for v in (1.0, 0.5, 0.0))
    judge_nan = sum(o is None for o in outcomes)
    n = wins + ties + losses
    if n == 0:
        raise ValueError(
            f"all {judge_nan} judgements were non-finite (NaN/inf margins), so there is no win rate; "
            "check the judge (its dtype, its inputs) on a few of the held-out answers"
        )
    p = (wins + ties / 2) / n
    return WinRate(p, wilson_interval(p, n, z), wins, ties, losses, judge_nan, n)


def outcome(answer: str, other: str, margin: float) -> Optional[float]:
    """`answer`'s outcome against `other` from the judge's two-order margin: 1 (win), 0 (loss),
    ½ (tie: margin 0, or identical answers whatever the judge says), None (non-finite margin)."""
    if answer == other:
        return 0.5
    if not math.isfinite(margin):
        return None
    if margin == 0:
        return 0.5
    return 1.0 if margin > 0 else 0.0


def judge_outcomes(judge: Judge, prompts: Sequence[str], answers: Sequence[str], baseline: Sequence[str]) -> list[Optional[float]]:
    """Outcome of `answers` against `baseline` per prompt, both orders presented to the judge.

    One batched call: for the responses [answer, baseline] the judge's matrix M holds
    M[0, 1] (answer shown first) and M[1, 0] (baseline shown first), so the margin
    M[0, 1] − M[1, 0] already has both orders and a first-position bias cancels.
    None where that margin is not finite.
    """
    logits = judge.batch_pairwise_logits(prompts, [[a, b] for a, b in zip(answers, baseline)])
    outcomes = [outcome(a, b, float(m[0, 1] - m[1, 0])) for a, b, m in zip(answers, baseline, logits)]
    nan = sum(o is None for o in outcomes)
    if nan:
        log.warning("the judge gave %d of %d held-out pairs a non-finite margin: counted as judge_nan, left out of the win rate", nan, len(outcomes))
    return outcomes


def generate_answers(
    engine: Engine, prompts: Sequence[Prompt], sampling: SamplingConfig, batch_size: int, label: str = "answers"
) -> tuple[list[str], list[int]]:
    """One answer per prompt, in batches, with a progress line per batch; returns texts and
    token counts."""
    texts, lengths = [], []
    for start in range(0, len(prompts), batch_size):
        for rollout in engine.generate(prompts[start : start + batch_size], sampling):
            texts.append(rollout.responses[0])
            lengths.append(rollout.num_tokens[0])
        print(f"[eval] {label} {len(texts)}/{len(prompts)}", flush=True)
    return texts, lengths


def mt_bench_answers(
    engine: Engine, questions: Sequence[dict], sampling: SamplingConfig, batch_size: int, turns: int
) -> list[dict]:
    """Answers to MT-Bench questions, turn by turn: turn 2 is generated with the whole
    conversation so far (question 1, the policy's own answer 1, question 2) under the chat
    template, as FastChat's gen_model_answer does. Returns `{question_id, output: [..]}`."""
    conversations: list[list[dict]] = [[] for _ in questions]
    outputs: list[list[str]] = [[] for _ in questions]
    for turn in range(turns):
        todo = [n for n, q in enumerate(questions) if turn < len(q["turns"])]
        for n in todo:
            conversations[n].append({"role": "user", "content": questions[n]["turns"][turn]})
        answers, _ = generate_answers(
            engine, [conversations[n] for n in todo], sampling, batch_size, f"MT-Bench turn {turn + 1} answers"
        )
        for n, answer in zip(todo, answers):
            conversations[n].append({"role": "assistant", "content": answer})
            outputs[n].append(answer)
    return [{"question_id": q["question_id"], "output": out} for q, out in zip(questions, outputs)]


def evaluate_policy(
    cfg: "Config",
    policy_path: str,
    held_out: list[dict],
    baseline: list[str] | None,
    engine_factory: Callable | None = None,
    timeline_dir: str | None = None,
    submitted_at: float | None = None,
    judge_factory: Callable | None = None,
) -> dict:
    """Answers of the policy at `policy_path` on the held-out prompts (and MT-Bench's
    questions when `evaluate.mt_bench_source` is set) and, given π_0's answers, the judged
    win rate: `win_rate`, `win_rate_ci`, `wins`, `ties`, `losses`, `judge_nan`, `n`, `avg_length`.

    The judge is the training stream's (`cfg.judge`: `judge_factory(cfg.judge)`, the run's
    judge pool, or by default one built here); a reference-guided judge gets each
    held-out prompt's reference answer. With `evaluate.judge` (a preset of conf/judge/) the
    same pairs are judged again by that judge: `independent_win_rate`, `independent_win_rate_ci`,
    `independent_wins` … `independent_n`, `independent_judge` (the preset), and
    `judge_agreement`: the share of prompts both judges gave the same outcome, of the
    `judge_agreement_n` prompts judged by both where π_t's and π_0's answers differ
    (identical answers tie by rule, so they would agree trivially). Runs as one Ray task (resources from
    `cluster.evaluate`); plain Python otherwise. `engine_factory(cfg, policy_path)` gives
    the engine that answers: the run's rollout engines (`RolloutEngines.clients()`), or by
    default one built here (`make_engine`). With `timeline_dir` it records its start
    (`eval_start`: from `submitted_at`, the task's submission, if given, to the engine and
    the judge ready) and its answering and judging (`evaluation`), spo_ray/timeline.py.
    """
    entered = time.time()
    from spo_ray.modeling import load_tokenizer
    from spo_ray.rollout.factory import make_engine
    from spo_ray.timeline import record_interval, span

    e = cfg.evaluate
    if e.num_threads:  # this process's threads: the evaluation task's own, as a Ray task
        import torch

        torch.set_num_threads(e.num_threads)
    engine = (engine_factory or make_engine)(cfg, policy_path)
    record_interval(timeline_dir, "eval_start", submitted_at or entered, time.time())
    sampling = SamplingConfig(
        num_samples=1,
        temperature=0.0 if e.greedy else e.temperature,
        top_p=1.0 if e.greedy else cfg.rollout.top_p,
        max_new_tokens=e.max_new_tokens,
        seed=cfg.run.seed,
    )
    prompts = [p["prompt"] for p in held_out]
    with span(timeline_dir, "evaluation"):
        answers, lengths = generate_answers(engine, prompts, sampling, e.batch_size, "held-out answers")
        result: dict = {"answers": answers, "lengths": lengths, "avg_length": sum(lengths) / len(lengths)}
        if e.mt_bench_source is not None:
            from spo_ray.data.prompt_sets import load_mt_bench

            questions = load_mt_bench(None if e.mt_bench_source == "shipped" else e.mt_bench_source)
            result["mt_bench"] = mt_bench_answers(engine, questions, sampling, e.batch_size, e.mt_bench_turns)
    if baseline is None:
        return result
    tokenizer = load_tokenizer(policy_path, cfg.model.trust_remote_code)
    judged = partial(outcomes_under, held_out=held_out, answers=answers, baseline=baseline, tokenizer=tokenizer, timeline_dir=timeline_dir)
    training = judged(cfg.judge, "training", judge_factory=judge_factory)
    result.update(win_rate(training).as_dict())
    if e.judge is not None:
        from spo_ray.compose import judge_preset

        independent = judged(judge_preset(e.judge), f"independent ({e.judge})")
        result.update({f"independent_{k}": v for k, v in win_rate(independent).as_dict().items()})
        result["independent_judge"] = e.judge
        # Identical answers tie by rule whatever a judge says: only pairs that differ are compared.
        differ = [a != b for a, b in zip(answers, baseline)]
        result["judge_agreement"], result["judge_agreement_n"] = judge_agreement(
            [o for o, d in zip(training, differ) if d], [o for o, d in zip(independent, differ) if d]
        )
    return result


def outcomes_under(
    judge_cfg: "JudgeConfig",
    label: str,
    held_out: list[dict],
    answers: list[str],
    baseline: list[str],
    tokenizer,
    timeline_dir: str | None,
    judge_factory: Callable | None = None,
) -> list[Optional[float]]:
    """`judge_outcomes` under the judge `judge_cfg` (`judge_factory(judge_cfg)`, by default
    `build_judge`; its start-up recorded as `eval_start`, the judging as `evaluation`), each
    judge seeing the prompts in its own `prompt_format`; a reference-guided judge gets the
    held-out prompts' references."""
    from spo_ray.data.chat import judge_prompts
    from spo_ray.judge import attach_references, build_judge
    from spo_ray.timeline import span

    print(f"[eval] judging {len(answers)} answers against π_0's, both orders ({label} judge: {judge_cfg.name})", flush=True)
    with span(timeline_dir, "eval_start"):
        judge = (judge_factory or build_judge)(judge_cfg)
    with span(timeline_dir, "evaluation"):
        shown = judge_prompts([p["prompt"] for p in held_out], judge_cfg.prompt_format, tokenizer)
        attach_references(judge, shown, [p.get("reference") for p in held_out])
        return judge_outcomes(judge, shown, answers, baseline)


def judge_agreement(a: Sequence[Optional[float]], b: Sequence[Optional[float]]) -> tuple[Optional[float], int]:
    """How often two judges give a prompt the same outcome (win, tie or loss), over the n
    prompts both judged (a finite margin from each): (share, n); share is None when n = 0."""
    both = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    return (sum(x == y for x, y in both) / len(both) if both else None), len(both)


def write_answer_files(
    out_dir: Path, held_out: list[dict], answers: list[str], mt_bench: list[dict] | None, model_id: str
) -> None:
    """The answers in the official tools' formats: AlpacaEval's `model_outputs.json` (the
    held-out prompts) and, when MT-Bench was answered, FastChat's `mt_bench_answers.jsonl`."""
    from spo_ray.data.prompt_sets import write_alpaca_eval_outputs, write_mt_bench_answers

    records = [{"prompt": p["prompt"], "output": a, "dataset": p.get("dataset")} for p, a in zip(held_out, answers)]
    write_alpaca_eval_outputs(out_dir / "model_outputs.json", records, generator=model_id)
    if mt_bench is not None:
        write_mt_bench_answers(out_dir / "mt_bench_answers.jsonl", mt_bench, model_id=model_id)
