"""The Hydra entry point end to end: `python -m spo_ray.train experiment=tiny run.dir=X`."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spo_ray.timeline import STAGES
from tests.conftest import REPO
from tests.test_timeline import assert_invariants

FAST = [
    "experiment=tiny",
    "data.prompts_per_iteration=16",
    "data.num_eval=8",
    "rollout.num_samples=3",
    "rollout.max_new_tokens=16",
    "evaluate.max_new_tokens=16",
]

# What every iteration of these runs records (at least): π_t goes to the engines after every
# iteration (they answer its evaluation).
TINY_STAGES = {
    "weight_sync", "rollout_start", "generation", "judge_start", "judging", "learner_workers",
    "learner_models", "learner_wait", "learner_step", "save_policy", "eval_start", "evaluation", "tournament",
}


def _train(run_dir, *overrides):
    proc = subprocess.run(
        [sys.executable, "-m", "spo_ray.train", f"run.dir={run_dir}", *FAST, *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_two_iterations_write_the_run_directory_and_resume(ray_session, tmp_path):
    run = tmp_path / "run"
    # A run stopped after iteration 1 ...
    # (the length judge as the independent evaluation judge beside the training keyword judge)
    out1 = _train(run, "run.iterations=1", "evaluate.judge=length")
    assert "[spo_ray] iteration 1:" in out1 and "[learner]" in out1
    pairs_1 = sorted((run / "iter_1" / "pairs").iterdir())
    stamps = [p.stat().st_mtime_ns for p in pairs_1]
    # ... continues from its last finished iteration when started again with the same dir.
    out2 = _train(run, "run.iterations=2", "evaluate.judge=length")
    assert "iteration 1/2" not in out2 and "[spo_ray] iteration 2:" in out2
    assert [p.stat().st_mtime_ns for p in sorted((run / "iter_1" / "pairs").iterdir())] == stamps

    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "split.json", "report.md", "win_rate.png"):
        assert (run / name).exists(), name
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest == {"iter_0": ["policy", "eval"], "iter_1": ["train", "eval"], "iter_2": ["train", "eval"]}
    split = json.loads((run / "split.json").read_text())
    assert len(split["held_out"]) == 8 and not set(split["held_out"]) & set(split["train"])

    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    iterations = [r for r in records if r["kind"] == "iteration"]
    assert [r["iteration"] for r in iterations] == [1, 2]
    assert all(r["pairs"] + sum(r["skipped"].values()) == 16 for r in iterations)
    assert any(r["kind"] == "step" and "grad_norm" in r and "lr" in r for r in records)
    for t in (1, 2):
        ev = json.loads((run / f"iter_{t}" / "eval.json").read_text())
        assert set(ev) >= {"win_rate", "win_rate_ci", "avg_length", "wins", "ties", "losses", "judge_nan", "n"} and ev["n"] == 8
        assert ev["win_rate_ci"][0] <= ev["win_rate"] <= ev["win_rate_ci"][1]
        assert list((run / f"iter_{t}" / "pairs").glob("*.parquet"))
    # A second judge on the same pairs, and the tournament of the iterates: its W[t][0] is the
    # evaluation's π_t-vs-π_0 win rate (same judge, same stored answers, same outcome rule).
    from spo_ray.tournament import KEYS

    for t in (1, 2):
        ev = json.loads((run / f"iter_{t}" / "eval.json").read_text())
        answers = [json.loads((run / f"iter_{s}" / "answers.json").read_text())["answers"] for s in (0, t)]
        differ = sum(a != b for a, b in zip(*answers))
        assert ev["independent_judge"] == "length" and ev["independent_n"] == 8 and ev["judge_agreement_n"] == differ
        assert ev["independent_win_rate_ci"][0] <= ev["independent_win_rate"] <= ev["independent_win_rate_ci"][1]
        assert differ == 0 or 0 <= ev["judge_agreement"] <= 1
        tournament = json.loads((run / f"iter_{t}" / "tournament.json").read_text())
        assert tuple(tournament) == KEYS and tournament["policies"] == [f"π_{s}" for s in range(t + 1)]
        assert tournament["win_rate"][t][0] == ev["win_rate"] and sum(tournament["nash"]) == pytest.approx(1)
    first = json.loads((run / "iter_1" / "eval.json").read_text())["win_rate"]
    assert tournament["win_rate"][1][0] == first and len(tournament["exploitability"]) == 3
    # the keyword judge's preference is learnable: π_2 beats π_0
    assert iterations[-1]["win_rate"] > 0.5

    report = (run / "report.md").read_text()
    assert "| 2 |" in report and "win_rate.png" in report and "## Examples" in report
    assert "## Independent judge (length)" in report and "## Tournament of the iterates" in report
    assert (run / "tournament.png").stat().st_size > 1000

    # where each iteration's time went, recorded by the driver, the stage actors, the learner
    # workers and the evaluation task (each iteration here starts its driver, so its engines)
    timelines = [r for r in records if r["kind"] == "timeline"]
    assert [r["iteration"] for r in timelines] == [1, 2]
    for t, in_metrics in zip((1, 2), timelines):
        timeline = json.loads((run / f"iter_{t}" / "timeline.json").read_text())
        assert {k: v for k, v in in_metrics.items() if k not in ("kind", "iteration")} == timeline
        assert_invariants(timeline)
        assert TINY_STAGES <= {s["name"] for s in timeline["stages"]} <= set(STAGES)
        assert timeline["work_s"] > 0 and iterations[t - 1]["overhead_s"] == timeline["overhead_s"]
    assert "## Where the time went" in report and (run / "timeline.png").stat().st_size > 1000

    pi0 = AutoModelForCausalLM.from_pretrained(run / "iter_0" / "policy")
    pi1 = AutoModelForCausalLM.from_pretrained(run / "iter_1" / "policy")
    AutoTokenizer.from_pretrained(run / "iter_2" / "policy")
    assert any(not torch.equal(a, b) for a, b in zip(pi0.state_dict().values(), pi1.state_dict().values()))

    # a finished run started again does nothing but rewrite the report
    out3 = _train(run, "run.iterations=2", "evaluate.judge=length")
    assert "streaming" not in out3 and json.loads((run / "manifest.json").read_text()) == manifest


def test_evaluate_overlap_answers_pi_1_beside_iteration_2s_stream(ray_session, tmp_path):
    run = tmp_path / "run"
    # the evaluation task's CPU beside the stream's pools: 0.25 leaves Ray a whole CPU free
    out = _train(run, "run.iterations=2", "evaluate.overlap=true", "cluster.evaluate.num_cpus=0.25")
    assert "[spo_ray] iteration 1:" in out and "[spo_ray] iteration 2:" in out
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    iterations = {r["iteration"]: r for r in records if r["kind"] == "iteration"}
    assert iterations[1]["eval_overlapped"] and not iterations[2]["eval_overlapped"]
    first, second = (json.loads((run / f"iter_{t}" / "timeline.json").read_text()) for t in (1, 2))
    for timeline in (first, second):
        assert_invariants(timeline)
    # iteration 1 ends with π_1 on the engines; its evaluation and tournament are iteration 2's
    assert "evaluation" not in {s["name"] for s in first["stages"]}
    # π_1's evaluation was submitted with iteration 2's stream, before its learner finished
    # (when Ray runs the task depends on the machine's load: not asserted), and iteration 2
    # holds both evaluations: π_1's beside the stream, π_2's after it
    stage = {s["name"]: s for s in second["stages"]}
    assert stage["eval_start"]["start_s"] < stage["learner_step"]["end_s"], second
    assert len(stage["evaluation"]["intervals"]) >= 2 and len(stage["tournament"]["intervals"]) == 2
    ev = json.loads((run / "iter_1" / "eval.json").read_text())
    assert ev["n"] == 8 and json.loads((run / "iter_1" / "tournament.json").read_text())["policies"] == ["π_0", "π_1"]
