"""report.md from a run directory's metrics: the iteration table, the per-step log-ratio
plot and table, iterations.json, and the examples (changed answers first)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spo_ray.report import write_report
from spo_ray.run_dir import RunDir


def _iteration(t: int, win: float) -> dict:
    return {
        "kind": "iteration", "iteration": t, "pairs": 30, "skipped": {"all_tied": 2}, "steps": 4,
        "prompts_truncated": 0, "responses_truncated": 5, "loss": 812.5, "chosen_logratio": 0.25,
        "rejected_logratio": -0.5, "margin": 0.75, "win_rate": win, "win_rate_ci": [win - 0.1, win + 0.1],
        "avg_length": 40.0, "wins": 25, "ties": 3, "losses": 20, "judge_nan": 2, "n": 48, "baseline_avg_length": 41.5, "train_s": 300.0, "eval_s": 60.0,
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

    assert "| 2 | 30 | all_tied: 2 | 812.5 | +0.250 | -0.500 | +0.750 | 0.600 [0.500, 0.700] | 25 / 3 / 20 | 2 | 40.0 (π_0: 41.5) | 300 | 60 |" in report
    assert "| 1 | 2 | 8 | 800 | +0.200 | -0.400 | +0.600 | 5.00e-06 |" in report  # iteration 1, step 2
    assert "![a, b and a − b per step](logratios.png)" in report and (run.path / "logratios.png").stat().st_size > 1000
    assert (run.path / "win_rate.png").is_file()
    assert "| hello | hi\\nthere |" in report and "**Prompt:** Say | hi" in report
    assert [r["win_rate"] for r in json.loads((run.path / "iterations.json").read_text())] == [0.55, 0.6]


def test_records_appended_again_by_a_resumed_driver_are_reported_once(tmp_path):
    # A driver killed while appending an iteration's records appends them again when resumed
    # (all of them, summary included, before train.py checked for the iteration's record).
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


def test_a_report_interrupted_mid_write_leaves_the_previous_report_and_plots_whole(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    run = RunDir(tmp_path / "run")
    run.append_metrics(_step(1, 1, 0.1, -0.2))
    run.append_metrics(_iteration(1, 0.55))
    report = write_report(run, {"experiment": "x"}, [])
    before = report.read_bytes()
    run.append_metrics(_step(2, 1, 0.1, -0.2))
    run.append_metrics(_iteration(2, 0.6))

    write_text, savefig = Path.write_text, Figure.savefig

    def torn_text(path, text, *args, **kwargs):  # the process dies halfway through report.md
        if "report.md" in path.name:
            write_text(path, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return write_text(path, text, *args, **kwargs)

    def torn_png(fig, path, *args, **kwargs):  # ... or halfway through a plot
        Path(path).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", torn_text)
    with pytest.raises(KeyboardInterrupt):
        write_report(run, {"experiment": "x"}, [])
    assert report.read_bytes() == before
    plots = {name: (run.path / name).read_bytes() for name in ("win_rate.png", "logratios.png")}
    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(Figure, "savefig", torn_png)
    with pytest.raises(KeyboardInterrupt):
        write_report(run, {"experiment": "x"}, [])
    assert {name: (run.path / name).read_bytes() for name in plots} == plots


def test_records_from_before_wins_and_losses_were_counted_still_report(tmp_path):
    # A run directory resumed across the change has iteration records with ties and n only.
    run = RunDir(tmp_path / "run")
    old = {k: v for k, v in _iteration(1, 0.55).items() if k not in ("wins", "losses", "judge_nan")}
    run.append_metrics(old)
    report = write_report(run, {"experiment": "x"}, []).read_text()
    assert "| 0.550 [0.450, 0.650] | ? / 3 / ? (n=48) | ? | 40.0 (π_0: 41.5) |" in report
    assert "| 300 | 60 | ? |" in report  # nor a timeline: its overhead is unknown


def _timeline(t: int, wall: float, work: float) -> dict:
    stages = [
        {"name": "judge_start", "start_s": 0.0, "end_s": 4.0, "busy_s": 4.0, "intervals": [[0.0, 4.0]]},
        {"name": "generation", "start_s": 1.0, "end_s": 1.0 + work, "busy_s": work, "intervals": [[1.0, 1.0 + work]]},
    ]
    return {"kind": "timeline", "iteration": t, "wall_s": wall, "work_s": work, "overhead_s": wall - work, "stages": stages}


def test_the_timeline_is_charted_and_the_overhead_is_in_the_table(tmp_path):
    run = RunDir(tmp_path / "run")
    for t, (wall, work) in ((1, (200.0, 80.0)), (2, (150.0, 90.0))):
        run.append_metrics(_timeline(t, wall, work))
        run.append_metrics({**_iteration(t, 0.5), "wall_s": wall, "work_s": work, "overhead_s": wall - work})
    report = write_report(run, {"experiment": "x"}, []).read_text()

    assert "| 300 | 60 | 120 of 200 |" in report and "| 300 | 60 | 60 of 150 |" in report
    assert "## Where the time went" in report and "![timeline](timeline.png)" in report
    assert (run.path / "timeline.png").stat().st_size > 1000
    assert "| judge_start | 4.0 | 4.0 |" in report and "| **generation** | 80.0 | 90.0 |" in report  # work in bold
    assert "| wall / work / overhead | 200 / 80 / 120 | 150 / 90 / 60 |" in report
