"""The iteration timeline (spo_ray/timeline.py): merging hand-made busy intervals into
timeline.json, and the per-process recording files it is merged from."""

from __future__ import annotations

import json

import pytest

from spo_ray.run_dir import RunDir
from spo_ray.timeline import Interval, biggest_overheads, build_timeline, read_intervals, record_interval, span, union, write_timeline

T0 = 1_700_000_000.0  # a time.time() stamp: the iteration's start


def _iv(name: str, start: float, end: float) -> Interval:
    return Interval(name, T0 + start, T0 + end)


def assert_invariants(timeline: dict) -> None:
    """What every timeline.json satisfies (also checked on a real run, tests/test_train_e2e.py)."""
    assert set(timeline) >= {"wall_s", "work_s", "stages"}
    assert 0 <= timeline["work_s"] <= timeline["wall_s"]
    for s in timeline["stages"]:
        assert set(s) >= {"name", "start_s", "end_s", "busy_s"}
        assert 0 <= s["start_s"] <= s["end_s"] <= timeline["wall_s"], s  # inside the iteration
        assert s["busy_s"] <= s["end_s"] - s["start_s"] + 1e-6, s
        # the stage's own intervals are sorted, do not overlap (rounded to the millisecond, two
        # may touch), and sum to busy_s
        spans = s["intervals"]
        assert all(a <= b for a, b in spans) and all(spans[n][1] <= spans[n + 1][0] for n in range(len(spans) - 1)), s
        assert sum(b - a for a, b in spans) == pytest.approx(s["busy_s"], abs=1e-6)


def test_overlapping_work_is_counted_once_and_overhead_is_the_rest():
    intervals = [
        _iv("rollout_start", 0, 5),
        _iv("generation", 5, 15),  # rollout actor 1
        _iv("generation", 10, 20),  # rollout actor 2, overlapping actor 1
        _iv("judging", 12, 22),  # overlaps generation
        _iv("learner_models", 3, 13),  # start-up: overhead, even while work runs beside it
        _iv("learner_step", 25, 30),
        _iv("save_policy", 30, 32),
        _iv("evaluation", 35, 40),
    ]
    tl = build_timeline(intervals, T0, T0 + 42)

    assert_invariants(tl)
    assert tl["wall_s"] == 42
    # work: [5, 22] ∪ [25, 30] ∪ [35, 40] = 17 + 5 + 5
    assert tl["work_s"] == 27 and tl["overhead_s"] == 15
    stages = {s["name"]: s for s in tl["stages"]}
    assert stages["generation"] == {"name": "generation", "start_s": 5, "end_s": 20, "busy_s": 15, "intervals": [[5, 20]]}
    assert stages["judging"]["busy_s"] == 10 and stages["learner_models"]["busy_s"] == 10
    # rows in the pipeline's order, not by time or name
    assert [s["name"] for s in tl["stages"]] == [
        "rollout_start", "generation", "judging", "learner_models", "learner_step", "save_policy", "evaluation"
    ]
    assert biggest_overheads(tl, 2) == [("learner_models", 10), ("rollout_start", 5)]


def test_separate_intervals_of_a_stage_stay_separate_bars():
    tl = build_timeline([_iv("learner_step", 1, 2), _iv("learner_step", 4, 6), _iv("learner_step", 5, 7)], T0, T0 + 10)

    assert_invariants(tl)
    (step,) = tl["stages"]
    assert step["intervals"] == [[1, 2], [4, 7]] and step["busy_s"] == 4 and tl["work_s"] == 4


def test_intervals_outside_the_drivers_window_widen_the_iteration():
    # A driver restarted after `train` finished keeps that attempt's intervals, which began
    # before this driver's start; a task may also finish after the driver read the clock.
    tl = build_timeline([_iv("learner_step", -30, -20), _iv("evaluation", 0, 12)], T0, T0 + 10)

    assert_invariants(tl)
    assert tl["wall_s"] == 42 and tl["work_s"] == 22
    assert [(s["name"], s["start_s"], s["end_s"]) for s in tl["stages"]] == [("learner_step", 0, 10), ("evaluation", 30, 42)]


def test_unknown_stages_are_kept_after_the_known_ones_and_are_not_work():
    tl = build_timeline([_iv("zz_custom", 0, 3), _iv("aa_custom", 1, 2), _iv("judging", 2, 4)], T0, T0 + 5)

    assert [s["name"] for s in tl["stages"]] == ["judging", "aa_custom", "zz_custom"]
    assert tl["work_s"] == 2


def test_an_iteration_without_records_is_all_overhead_and_a_backwards_interval_is_left_out():
    assert build_timeline([], T0, T0 + 3) == {"wall_s": 3, "work_s": 0, "overhead_s": 3, "stages": []}
    tl = build_timeline([_iv("generation", 5, 4), _iv("generation", 1, 2)], T0, T0 + 3)
    assert tl["stages"][0]["intervals"] == [[1, 2]] and tl["work_s"] == 1


def test_union():
    assert union([(3, 4), (0, 1), (1, 2), (0.5, 1.5), (5, 5)]) == [(0, 2), (3, 4), (5, 5)]
    assert union([]) == []


def test_recorded_intervals_are_merged_into_timeline_json(tmp_path):
    run = RunDir(tmp_path / "run")
    parts = run.timeline_parts(1)
    record_interval(parts, "generation", T0 + 1, T0 + 2)
    record_interval(None, "generation", T0, T0 + 100)  # not recording: no-op
    with span(parts, "judging"):
        pass
    with pytest.raises(RuntimeError), span(parts, "learner_step"):  # a failed step did no work
        raise RuntimeError("worker lost")
    (parts / "other-host-7.jsonl").write_text(json.dumps({"name": "learner_step", "start": T0 + 2, "end": T0 + 3}) + '\n{"name": "lear')

    intervals = read_intervals(parts)
    # the failed step and the torn last line are not in it
    assert sorted(i.name for i in intervals) == ["generation", "judging", "learner_step"]
    assert len(list(parts.glob("*.jsonl"))) == 2  # one file per process
    timeline = write_timeline(run, 1, T0)
    assert json.loads(run.timeline(1).read_text()) == timeline
    assert run.timeline(1) == run.path / "iter_1" / "timeline.json"
    assert_invariants(timeline)
    assert timeline["work_s"] >= 2


def test_a_restarted_train_stage_starts_its_timeline_afresh(tmp_path):
    run = RunDir(tmp_path / "run")
    record_interval(run.timeline_parts(1), "generation", T0, T0 + 1)
    run.prepare_train(1)
    assert read_intervals(run.timeline_parts(1)) == []
