"""The run directory (spo_ray/run_dir.py): JSON-lines files that survive a crash mid-append,
folders written then renamed."""

from __future__ import annotations

import json

import pytest

from spo_ray.run_dir import RunDir, write_folder_then_rename
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


def test_a_folder_is_written_whole_or_not_at_all(tmp_path):
    out = tmp_path / "policy"
    with write_folder_then_rename(out) as tmp:
        (tmp / "a.txt").write_text("one")
        assert not out.exists()  # nothing there until the block ends
    assert (out / "a.txt").read_text() == "one" and out.stat().st_mode & 0o777 == 0o755

    with pytest.raises(RuntimeError, match="crash"):
        with write_folder_then_rename(out) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("crash mid-write")
    assert (out / "a.txt").read_text() == "one"  # the old folder, untouched

    with write_folder_then_rename(out) as tmp:  # replace=True: the new folder, nothing of the old
        (tmp / "b.txt").write_text("three")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]

    with pytest.raises(OSError):  # replace=False: another writer's folder is kept
        with write_folder_then_rename(out, replace=False) as tmp:
            (tmp / "c.txt").write_text("four")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]  # no temporaries left


def test_restarting_the_train_stage_removes_what_killed_writers_left_half_written(tmp_path):
    from spo_ray.run_dir import write_then_rename

    run = RunDir(tmp_path / "run")
    files = run.iteration(1)
    kept = files.pairs / "part-1-r000-00000.parquet"
    for folder in (files.dir, files.pairs, files.skipped, files.checkpoints):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".tmp-x.parquet-abc123").write_text("half")  # a file a killed worker left
    (files.checkpoints / ".tmp-step_000002-xyz").mkdir()  # and a checkpoint folder
    with write_then_rename(kept) as tmp:
        tmp.write_text("whole")
    run.prepare_train(1)
    left = [p for folder in (files.dir, files.pairs, files.skipped, files.checkpoints) for p in folder.glob(".tmp-*")]
    assert left == [] and kept.read_text() == "whole"
