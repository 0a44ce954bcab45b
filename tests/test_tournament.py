"""The tournament's judging and its command across runs, on rule judges and hand-made answers
(the meta-game maths itself: tests/test_metagame.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from spo_ray.evaluate import wilson_interval
from spo_ray.judge.rules import LengthJudge
from spo_ray.tournament import KEYS, main, pairwise_outcomes, tournament_record
from tests.conftest import compose


class CountingLength(LengthJudge):
    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def batch_pairwise_logits(self, prompts, responses):
        self.calls.append([len(r) for r in responses])
        return super().batch_pairwise_logits(prompts, responses)


class RockPaperScissors:
    """Answers are r, p or s; r beats s, s beats p, p beats r (logit ±1)."""

    BEATS = {("r", "s"), ("s", "p"), ("p", "r")}

    def batch_pairwise_logits(self, prompts, responses):
        return [
            torch.tensor([[float((a, b) in self.BEATS) - float((b, a) in self.BEATS) for b in rs] for a in rs])
            for rs in responses
        ]


def test_every_pair_is_judged_from_one_matrix_per_prompt():
    # answers[p][n]: by length, hand-judged below (identical answers tie whatever the judge says).
    answers = [["aa", "aaaa", "a", "x"], ["aaa", "aa", "a", "xy"], ["a", "aaaaa", "bb", "xyz"]]
    judge = CountingLength()
    outcomes = pairwise_outcomes(judge, [f"q{n}" for n in range(4)], answers, batch_size=3)
    assert judge.calls == [[3, 3, 3], [3]]  # 4 prompts in batches of 3, all 3 answers at once
    assert outcomes == {
        (0, 1): [0.0, 1.0, 0.5, 0.0],  # 2<3, 4>2, identical, 1<2
        (0, 2): [1.0, 0.0, 0.0, 0.0],
        (1, 2): [1.0, 0.0, 0.0, 0.0],
    }
    record = tournament_record(["π_0", "π_1", "π_2"], outcomes)
    assert tuple(record) == KEYS
    w = record["win_rate"]
    assert w == [[0.5, 0.375, 0.25], [0.625, 0.5, 0.25], [0.75, 0.75, 0.5]]
    lo, hi = wilson_interval(0.375, 4)
    assert record["win_rate_ci"][0][1] == [lo, hi]
    assert record["win_rate_ci"][1][0] == pytest.approx([1 - hi, 1 - lo])  # the same pair, mirrored
    assert record["win_rate_ci"][2][2] == [0.5, 0.5]
    # π_2 beats both: all Nash weight; exploitability = column max − ½
    assert record["nash"] == pytest.approx([0, 0, 1])
    assert record["exploitability"] == pytest.approx([0.25, 0.25, 0.0])
    assert record["cycles"] == []  # 4 prompts: no interval clears ½ anyway


def test_a_significant_cycle_is_named_by_its_policies():
    answers = [["r"] * 20, ["p"] * 20, ["s"] * 20]
    record = tournament_record(["rock", "paper", "scissors"], pairwise_outcomes(RockPaperScissors(), ["q"] * 20, answers, 8))
    assert record["win_rate"][1][0] == 1.0 and record["win_rate_ci"][1][0][0] > 0.8  # Wilson, n=20
    assert record["nash"] == pytest.approx([1 / 3] * 3)
    assert record["exploitability"] == pytest.approx([0.5] * 3)
    assert record["cycles"] == [["rock", "scissors", "paper"]]  # rock beats scissors beats paper beats rock


# ---------------------------------------------------------------------------- across runs
IDS = ["tiny-000", "tiny-001", "tiny-002", "tiny-003"]


def _fake_run(path, tiny_policy, answers_by_t: list[str], *overrides, ids=IDS):
    """A run directory as spo_ray.train leaves it, as far as the tournament reads it: config.yaml,
    iter_0/policy (for the tokenizer) and iter_<t>/answers.json (one answer for every prompt)."""
    raw, _ = compose(["experiment=tiny", f"run.dir={path}", *overrides])
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(OmegaConf.to_yaml(raw, resolve=True))
    shutil.copytree(tiny_policy, path / "iter_0" / "policy")
    for t, answer in enumerate(answers_by_t):
        (path / f"iter_{t}").mkdir(exist_ok=True)
        stored = {"prompt_ids": ids, "answers": [answer] * len(ids), "lengths": [len(answer)] * len(ids)}
        (path / f"iter_{t}" / "answers.json").write_text(json.dumps(stored))
    return path


def test_tournament_across_runs(tmp_path, tiny_policy, capsys):
    # The tiny preset's keyword judge prefers a larger share of "e": 0, 0.5 | 0.25, 1.
    a = _fake_run(tmp_path / "a", tiny_policy, ["x", "ex"])
    b = _fake_run(tmp_path / "b", tiny_policy, ["xxxe", "e"])
    out = tmp_path / "out"
    record = main([str(a), str(b), "--out", str(out)])
    assert record["policies"] == ["a:π_0", "a:π_1", "b:π_0", "b:π_1"]
    # shares .0, .5, .25, 1 rank b:π_1 > a:π_1 > b:π_0 > a:π_0 on every prompt
    assert record["win_rate"] == [[0.5, 0, 0, 0], [1, 0.5, 1, 0], [1, 0, 0.5, 0], [1, 1, 1, 0.5]]
    assert record["nash"] == pytest.approx([0, 0, 0, 1])
    assert record["exploitability"] == pytest.approx([0.5, 0.5, 0.5, 0])
    assert tuple(json.loads((out / "tournament.json").read_text())) == KEYS
    assert (out / "tournament.png").stat().st_size > 1000
    assert "| b:π_1 | 1.000 [" in (out / "tournament.md").read_text() and "[tournament] 4 policies" in capsys.readouterr().out

    # Another judge for all: by length, "xxxe" (b:π_0) is the longest.
    assert main([str(a), str(b), "--judge", "length", "--out", str(out)])["nash"] == pytest.approx([0, 0, 1, 0])


def test_tournament_refuses_runs_that_do_not_compare(tmp_path, tiny_policy):
    a = _fake_run(tmp_path / "a", tiny_policy, ["x", "ex"])
    other_prompts = _fake_run(tmp_path / "c", tiny_policy, ["x"], ids=IDS[::-1])
    with pytest.raises(ValueError, match="other held-out prompts.*same prompts"):
        main([str(a), str(other_prompts), "--out", str(tmp_path / "out")])
    other_judge = _fake_run(tmp_path / "d", tiny_policy, ["x"], "judge=length")
    with pytest.raises(ValueError, match="different judges.*--judge"):
        main([str(a), str(other_judge), "--out", str(tmp_path / "out")])
    assert main([str(a), str(other_judge), "--judge", "keyword", "--out", str(tmp_path / "out")])["policies"] == [
        "a:π_0", "a:π_1", "d:π_0",
    ]
    unknown = _fake_run(tmp_path / "e", tiny_policy, ["x"], ids=["tiny-000", "nope-1", "tiny-002", "tiny-003"])
    with pytest.raises(ValueError, match="'nope-1'.*not in data.source='tiny_prompts'"):
        main([str(unknown), "--out", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        main([str(tmp_path), "--out", str(tmp_path / "out")])


def test_report_shows_the_last_iterations_tournament(tmp_path):
    from spo_ray.report import write_report
    from spo_ray.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    record = tournament_record(["π_0", "π_1"], {(0, 1): [0.0, 0.0, 1.0, 0.5]})
    run.write_json(run.iteration(1).tournament, {**record, "nash": [0.25, 0.75]})
    run.write_json(run.iteration(2).tournament, record)
    report = write_report(run, {}, []).read_text()
    assert "## Tournament of the iterates" in report and "![tournament](tournament.png)" in report
    # W[1][0] = 1 − 0.375; π_1 beats π_0, so it holds all Nash weight and π_0's exploitability is 0.125
    assert "| π_1 | 0.625 [" in report and "| π_0 | — | 0.375 [" in report and "| 0.000 | 0.125 |" in report
    assert "| 1.000 | 0.000 |" in report and "0.750" not in report  # iteration 2's record, not 1's
    assert (run.path / "tournament.png").stat().st_size > 1000
