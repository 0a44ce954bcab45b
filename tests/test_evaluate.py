import math

import pytest
import torch

from spo_ray.evaluate import judge_outcomes, wilson_interval, win_rate
from spo_ray.judge.rules import LengthJudge


def test_win_rate_wilson_interval_by_hand():
    """2 wins, 1 tie, 1 loss: n = 4, p = (2 + ½)/4 = 0.625; z = 1.959964, z² = 3.841459.

    denominator 1 + z²/n = 1.960365
    centre (p + z²/2n) / 1.960365 = (0.625 + 0.480182) / 1.960365 = 0.563764
    half   z·√(p(1−p)/n + z²/4n²) / 1.960365 = 1.959964·√(0.058594 + 0.060023) / 1.960365 = 0.344337
    interval [0.219427, 0.908101]  (the Wald interval was 0.625 ± 0.469, clipped to 1)
    """
    r = win_rate([1, 1, 0.5, 0])
    assert r.win_rate == 0.625 and (r.wins, r.ties, r.losses, r.judge_nan, r.n) == (2, 1, 1, 0, 4)
    assert r.win_rate_ci == pytest.approx((0.219427, 0.908101), abs=1e-6)
    d = r.as_dict()
    assert set(d) == {"win_rate", "win_rate_ci", "wins", "ties", "losses", "judge_nan", "n"}
    assert isinstance(d["win_rate_ci"], list)


def test_all_wins_has_a_non_zero_width():
    """10 wins of 10: p = 1, so p(1−p) = 0 and Wald's interval is [1, 1]. Wilson:
    centre (1 + z²/20) / (1 + z²/10), half (z²/20) / (1 + z²/10), so the lower end is
    1 / (1 + z²/10) = 1 / 1.384146 = 0.722467 and the upper end 1."""
    r = win_rate([1.0] * 10)
    assert r.win_rate == 1.0 and (r.wins, r.ties, r.losses) == (10, 0, 0)
    assert r.win_rate_ci == pytest.approx((0.722467, 1.0), abs=1e-6)


def test_all_ties_has_a_non_zero_width():
    """10 ties: p = ½, centre ½, half z·√(0.025 + z²/400) / (1 + z²/10)
    = 1.959964·√(0.034604) / 1.384146 = 0.263407."""
    r = win_rate([0.5] * 10)
    assert r.win_rate == 0.5 and r.ties == 10
    assert r.win_rate_ci == pytest.approx((0.5 - 0.263407, 0.5 + 0.263407), abs=1e-6)


def test_smollm2_counts_give_the_interval_quoted_in_the_readme():
    """89 wins, 57 ties, 54 losses: p = 117.5/200 = 0.5875; z²/n = 0.019207,
    centre (0.5875 + 0.009604) / 1.019207 = 0.585851,
    half 1.959964·√(0.0012120 + 0.0000240) / 1.019207 = 0.067600 → [0.518, 0.653]."""
    lo, hi = wilson_interval(0.5875, 200)
    assert (round(lo, 3), round(hi, 3)) == (0.518, 0.653)


def test_non_finite_judgements_are_counted_and_left_out():
    # 1 win, 1 loss, 2 NaN: n = 2, p = ½ (as if the NaNs had not been there).
    r = win_rate([1.0, None, 0.0, None])
    assert (r.wins, r.ties, r.losses, r.judge_nan, r.n) == (1, 0, 1, 2, 2)
    assert r.win_rate == 0.5 and r.win_rate_ci == win_rate([1.0, 0.0]).win_rate_ci


def test_win_rate_rejects_bad_input():
    with pytest.raises(ValueError, match="no outcomes"):
        win_rate([])
    with pytest.raises(ValueError, match="0.3"):
        win_rate([0.3])
    with pytest.raises(ValueError, match="all 2 judgements were non-finite"):
        win_rate([None, None])


class _FirstSlotBiased(LengthJudge):
    """A judge that adds +5 to whichever response is shown first. M[i, j] is the judge's
    logit for "i beats j" with i shown first, so the bias is on every off-diagonal entry;
    the two-order margin M[0, 1] − M[1, 0] must cancel it."""

    def pairwise_logits(self, prompt, responses):
        m = super().pairwise_logits(prompt, responses)
        return m + 5.0 * (1 - torch.eye(len(responses)))


def test_outcomes_use_both_orders_and_identical_answers_tie():
    outcomes = judge_outcomes(_FirstSlotBiased(), ["p"] * 4, ["long", "s", "same", "ab"], ["s", "long", "same", "cd"])
    assert outcomes == [1.0, 0.0, 0.5, 0.5]


class _CountingJudge(LengthJudge):
    def __init__(self):
        self.calls = []

    def batch_pairwise_logits(self, prompts, responses):
        self.calls.append([list(r) for r in responses])
        return super().batch_pairwise_logits(prompts, responses)


def test_each_pair_is_judged_once():
    # The batched call already scores both orders of [answer, baseline]; a second call with
    # [baseline, answer] would only judge every pair again.
    judge = _CountingJudge()
    outcomes = judge_outcomes(judge, ["p", "q", "r"], ["aaa", "b", "cc"], ["a", "bbb", "cc"])
    assert outcomes == [1.0, 0.0, 0.5]
    assert judge.calls == [[["aaa", "a"], ["b", "bbb"], ["cc", "cc"]]]


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_judgement_is_no_outcome(value):
    class BrokenJudge(LengthJudge):
        def pairwise_logits(self, prompt, responses):
            return torch.tensor([[0.0, value], [0.0, 0.0]])

    # A non-finite margin is None (counted as judge_nan), not a tie; identical answers
    # still tie without the judge's word.
    assert judge_outcomes(BrokenJudge(), ["p", "q", "r"], ["a", "same", "ccc"], ["b", "same", "c"]) == [None, 0.5, None]


def test_the_readme_smollm2_counts_follow_from_the_stored_records():
    """benchmarks/results/smollm2_sppo/iterations.json holds win_rate, ties and n (the run
    predates wins and losses): win_rate · n = wins + ties/2, so wins and losses follow."""
    import json
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    for r in json.loads((repo / "benchmarks/results/smollm2_sppo/iterations.json").read_text()):
        wins = round(r["win_rate"] * r["n"] - r["ties"] / 2)
        losses = r["n"] - wins - r["ties"]
        lo, hi = wilson_interval(r["win_rate"], r["n"])
        row = f"**{r['win_rate']:.3f}** [{lo:.3f}, {hi:.3f}] | {wins} / {r['ties']} / {losses} |"
        assert row in readme, row
    assert "win rate 0.588 (89 wins, 57 ties, 54 losses)" in readme


def test_judge_agreement_counts_prompts_both_judges_judged():
    from spo_ray.evaluate import judge_agreement

    # prompt 2: the second judge gave no outcome; prompt 3: different outcomes.
    assert judge_agreement([1.0, 0.5, 0.0, 1.0], [1.0, 0.5, None, 0.0]) == (2 / 3, 3)
    assert judge_agreement([None], [1.0]) == (None, 0)


def test_evaluate_policy_reports_an_independent_judge(tiny_policy):
    """The keyword judge trains (`experiment=tiny`); `evaluate.judge=length` judges the same
    pairs again: each outcome follows from the answers' lengths, computed here by hand."""
    from spo_ray.evaluate import evaluate_policy
    from tests.conftest import compose

    cfg = compose(["experiment=tiny", "evaluate.judge=length", "evaluate.max_new_tokens=6", "evaluate.batch_size=4"])[1]
    held_out = [{"prompt_id": f"p{n}", "prompt": f"q{n}"} for n in range(3)]
    baseline = ["", "eeee", "z" * 1000]
    result = evaluate_policy(cfg, tiny_policy, held_out, baseline=baseline)
    answers = result["answers"]

    def by(feature):
        return [0.5 if a == b or feature(a) == feature(b) else float(feature(a) > feature(b)) for a, b in zip(answers, baseline)]

    by_length = by(len)
    by_keyword = by(lambda s: s.count("e") / len(s) if s else 0.0)
    assert by_length[2] == 0.0  # six tokens never outgrow 1000 characters
    assert result["win_rate"] == pytest.approx(sum(by_keyword) / 3)
    assert result["independent_win_rate"] == pytest.approx(sum(by_length) / 3)
    assert result["independent_judge"] == "length" and result["independent_n"] == 3
    assert result["independent_wins"] == by_length.count(1.0) and result["independent_losses"] == by_length.count(0.0)
    lo, hi = result["independent_win_rate_ci"]
    assert lo <= result["independent_win_rate"] <= hi
    differ = [n for n, (a, b) in enumerate(zip(answers, baseline)) if a != b]  # identical answers are left out
    assert result["judge_agreement_n"] == len(differ)
    assert result["judge_agreement"] == pytest.approx(sum(by_keyword[n] == by_length[n] for n in differ) / len(differ))


def test_an_unknown_independent_judge_fails_while_composing():
    from tests.conftest import compose

    with pytest.raises(ValueError, match="evaluate.judge='nope' names no preset.*reference_mpnet"):
        compose(["experiment=tiny", "evaluate.judge=nope"])


def test_evaluate_num_threads_sets_the_evaluations_torch_threads(tiny_policy):
    """evaluate.num_threads: the evaluation runs with that many torch threads (the
    independent judge embeds there); null leaves the process's own."""
    import torch

    from spo_ray.evaluate import evaluate_policy
    from tests.conftest import compose

    before = torch.get_num_threads()
    held_out = [{"prompt_id": "p0", "prompt": "q0"}]
    try:
        for threads, expected in ((None, before), (1, 1), (2, 2)):
            overrides = ["experiment=tiny", "evaluate.max_new_tokens=2", f"evaluate.num_threads={'null' if threads is None else threads}"]
            evaluate_policy(compose(overrides)[1], tiny_policy, held_out, baseline=None)
            assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="evaluate.num_threads"):
        compose(["experiment=tiny", "evaluate.num_threads=0"])
