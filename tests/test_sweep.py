"""Hydra sweeps (spo_ray/sweep.py): every point in its own run dir on one Ray, and a summary."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from spo_ray.sweep import point_record, write_summary
from tests.conftest import REPO
from tests.test_job_submit import FAST


def _train(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "spo_ray.train", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_two_point_sweep_runs_each_point_in_its_own_dir_and_writes_a_summary(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = _train(["-m", "experiment=tiny", "learner.loss=sppo,dpo", f"hydra.sweep.dir={sweep_dir}", *FAST], timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]

    # One Ray for the whole sweep: the second point reuses the driver's connection.
    assert out.count("Started a local Ray instance") + out.count("Connected to Ray cluster") == 1, out[-5000:]

    for job, loss in ((0, "sppo"), (1, "dpo")):
        run_dir = sweep_dir / str(job)
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())  # the resolved config, next to the artifacts
        assert saved["learner"]["loss"] == loss
        assert Path(saved["run"]["dir"]) == run_dir
        for name in ("report.md", "metrics.jsonl", "iter_1/eval.json", "iter_1/policy/config.json", "hydra/overrides.yaml"):
            assert (run_dir / name).is_file(), f"point {job}: {name}"

    rows = list(csv.DictReader(open(sweep_dir / "sweep_summary.csv")))
    assert [r["job"] for r in rows] == ["0", "1"]
    for row, loss in zip(rows, ("sppo", "dpo")):
        assert f"learner.loss={loss}" in row["overrides"] and "experiment=tiny" in row["overrides"]
        assert row["status"] == "completed" and row["iterations"] == "1" and not row["error"]
        win_rate = float(row["win_rate"])
        assert float(row["ci_low"]) <= win_rate <= float(row["ci_high"])
        assert float(row["wall_s"]) > 0
        assert Path(row["run_dir"]) == sweep_dir / row["job"]
        eval_json = json.loads((Path(row["run_dir"]) / "iter_1" / "eval.json").read_text())
        assert win_rate == eval_json["win_rate"]
    markdown = (sweep_dir / "sweep_summary.md").read_text()
    assert "Every point: `experiment=tiny run.iterations=1" in markdown
    assert "| 1 | `learner.loss=dpo` | completed | 1 |" in markdown and markdown.count("| completed |") == 2


def test_run_dir_in_a_sweep_is_refused_and_the_failed_point_is_summarized(tmp_path):
    """Points must not share a run dir (the second would resume the first); the error comes
    before Ray starts, and failed points still get their summary row."""
    sweep_dir = tmp_path / "sweep"
    proc = _train(["-m", "experiment=tiny", f"run.dir={tmp_path / 'x'}", f"hydra.sweep.dir={sweep_dir}"], timeout=120)
    assert proc.returncode != 0
    assert "run.dir cannot be set in a sweep" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    (row,) = csv.DictReader(open(sweep_dir / "sweep_summary.csv"))
    assert row["status"] == "failed" and "hydra.sweep.dir" in row["error"]


def test_summary_rows_come_from_each_points_metrics(tmp_path):
    sweep_dir = tmp_path / "sweep"
    for job, rate in ((1, 0.75), (0, 0.5)):
        run_dir = sweep_dir / str(job)
        run_dir.mkdir(parents=True)
        lines = [
            {"kind": "step", "loss": 1.0},
            {"kind": "iteration", "iteration": 1, "win_rate": 0.5, "win_rate_ci": [0.4, 0.6]},
            {"kind": "iteration", "iteration": 2, "win_rate": rate, "win_rate_ci": [rate - 0.1, rate + 0.1]},
        ]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        record = point_record(run_dir, job, ["experiment=tiny", f"learner.lr={job}"], "completed", 12.34)
        (run_dir / "sweep_point.json").write_text(json.dumps(record))
    never_started = sweep_dir / "2"
    never_started.mkdir()
    (never_started / "sweep_point.json").write_text(
        json.dumps(point_record(never_started, 2, ["learner.lr=x"], "failed", 0.5, "ValueError: bad"))
    )

    rows = write_summary(sweep_dir)

    assert [r["job"] for r in rows] == [0, 1, 2]
    assert rows[1]["win_rate"] == 0.75 and rows[1]["iterations"] == 2 and rows[1]["ci_high"] == 0.85
    assert rows[2]["win_rate"] is None and rows[2]["iterations"] == 0 and rows[2]["status"] == "failed"
    markdown = (sweep_dir / "sweep_summary.md").read_text()
    assert "| 1 | `experiment=tiny learner.lr=1` | completed | 2 | 0.750 | [0.650, 0.850] | 12 s |" in markdown
    assert "Every point" not in markdown  # point 2 shares no override with the others
    assert "failed: ValueError: bad" in markdown
    assert len(list(csv.DictReader(open(sweep_dir / "sweep_summary.csv")))) == 3
