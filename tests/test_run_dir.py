"""The run directory (spo_ray/run_dir.py): JSON-lines files that survive a crash mid-append."""

from __future__ import annotations

import json

import pytest

from spo_ray.run_dir import RunDir
from spo_ray.sweep import point_record


def test_a_last_line_cut_short_by_a_crash_is_dropped_and_a_bad_line_elsewhere_raises(tmp_path):
    run = RunDir(tmp_path / "run")
    (run.path / "metrics.jsonl").write_text('{"kind": "step", "step": 1}\n{"kind": "iteration", "iteration": 1, "win_r')
    assert run.metrics() == [{"kind": "step", "step": 1}]
    assert point_record(run.path, 0, [], "failed", 1.0)["iterations"] == 0  # the sweep summary reads it too

    (run.path / "metrics.jsonl").write_text('{"kind": "step", "st\n{"kind": "step", "step": 2}\n')
    with pytest.raises(json.JSONDecodeError):
        run.metrics()


def test_a_record_appended_after_a_torn_line_starts_a_line_of_its_own(tmp_path):
    run = RunDir(tmp_path / "run")
    metrics = run.path / "metrics.jsonl"
    metrics.write_text('{"kind": "step", "step": 1}\n{"kind": "step", "st')
    run.append_metrics({"kind": "step", "step": 2})
    run.append_metrics({"kind": "step", "step": 3})
    assert [m["step"] for m in run.metrics()] == [1, 2, 3]  # the torn fragment dropped, nothing swallowed

    metrics.write_text('{"kind": "step", "step": 1}')  # complete: only its newline was lost
    run.append_metrics({"kind": "step", "step": 2})
    assert metrics.read_text() == '{"kind": "step", "step": 1}\n{"kind": "step", "step": 2}\n'
