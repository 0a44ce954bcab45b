"""report.md from a run directory's metrics: the iteration table, the per-step log-ratio
plot and table, iterations.json, and the examples (changed answers first)."""

from __future__ import annotations

import json

from spo_ray.report import write_report
from spo_ray.run_dir import RunDir


def _iteration(t: int, win: float) -> dict:
    return {
        "kind": "iteration", "iteration": t, "pairs": 30, "skipped": {"all_tied": 2}, "steps": 4,
        "prompts_truncated": 0, "responses_truncated": 5, "loss": 812.5, "chosen_logratio": 0.25,
        "rejected_logratio": -0.5, "margin": 0.75, "win_rate": win, "win_rate_ci": [win - 0.1, win + 0.1],
        "avg_length": 40.0, "ties": 3, "n": 48, "baseline_avg_length": 41.5, "train_s": 300.0, "eval_s": 60.0,
    }


def _step(t: int, step: int, a: float, b: float) -> dict:
    return {"kind": "step", "iteration": t, "epoch": 0, "step": step, "loss": 800.0, "chosen_logratio": a,
            "rejected_logratio": b, "margin": a - b, "pairs": 8, "grad_norm": 1.0, "lr": 5e-6, "elapsed_s": 10.0}


def test_report_tables_plots_and_records(tmp_path):
    run = RunDir(tmp_path / "run")
    for t, win in ((1, 0.55), (2, 0.6)):
        for step in (1, 2):
            run.append_metrics(_step(t, step, 0.1 * step, -0.2 * step))
        run.append_metrics(_iteration(t, win))
    examples = [{"prompt": "Say | hi", "baseline": "hello", "answer": "hi\nthere", "iteration": 2}]
    report = write_report(run, {"experiment": "x"}, examples).read_text()

    assert "| 2 | 30 | all_tied: 2 | 812.5 | +0.250 | -0.500 | +0.750 | 0.600 [0.500, 0.700] | 3/48 | 40.0 (π_0: 41.5) | 300 | 60 |" in report
    assert "| 1 | 2 | 8 | 800 | +0.200 | -0.400 | +0.600 | 5.00e-06 |" in report  # iteration 1, step 2
    assert "![a, b and a − b per step](logratios.png)" in report and (run.path / "logratios.png").stat().st_size > 1000
    assert (run.path / "win_rate.png").is_file()
    assert "| hello | hi\\nthere |" in report and "**Prompt:** Say | hi" in report
    assert [r["win_rate"] for r in json.loads((run.path / "iterations.json").read_text())] == [0.55, 0.6]


def test_records_appended_again_by_a_resumed_driver_are_reported_once(tmp_path):
    # train.py appends an iteration's step records and its summary, then marks the eval
    # stage done; a driver killed in between appends them all again when resumed.
    run = RunDir(tmp_path / "run")
    run.append_metrics(_step(1, 1, 0.1, -0.2))
    run.append_metrics(_step(1, 2, 0.2, -0.4))
    run.append_metrics(_iteration(1, 0.5))
    run.append_metrics(_step(1, 1, 0.1, -0.2))
    run.append_metrics(_step(1, 2, 0.2, -0.4))
    run.append_metrics(_iteration(1, 0.55))
    report = write_report(run, {"experiment": "x"}, []).read_text()

    assert report.count("| 1 | 2 | 8 | 800 | +0.200 | -0.400 | +0.600 | 5.00e-06 |") == 1
    assert report.count("| 1 | 1 | 8 | 800 |") == 1
    assert [r["win_rate"] for r in json.loads((run.path / "iterations.json").read_text())] == [0.55]
