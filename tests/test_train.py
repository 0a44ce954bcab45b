"""The recipe's driver (spo_ray/train.py `run_sppo`) with its stages stubbed: what it leaves
in the run dir across restarts, without Ray."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from spo_ray import train
from spo_ray.run_dir import RunDir
from tests.conftest import compose

PROMPTS = [{"prompt_id": f"p{i}", "prompt": f"prompt {i}"} for i in range(6)]


class _Killed(Exception):
    """The driver dies here."""


def _fake_stream_and_train(cfg, run: RunDir, prompts, policy, t: int, engines=None, learner=None, judges=None) -> dict:
    """What a finished train stage leaves: π_t, the summary, the step records, a step checkpoint."""
    it = run.iter_dir(t)
    (it / "policy").mkdir(parents=True)
    (it / "checkpoints" / "step_000002").mkdir(parents=True)
    (it / "checkpoints" / "step_000002" / "position.json").write_text(json.dumps({"step": 2}))
    steps = [{"iteration": t, "epoch": 0, "step": s, "loss": 0.5, "chosen_logratio": 0.1, "rejected_logratio": -0.1, "margin": 0.2, "pairs": 2} for s in (1, 2)]
    (it / "train_metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    summary = {"pairs": 4, "skipped": {}, "steps": 2, "prompts_truncated": 0, "responses_truncated": 0}
    run.write_json(f"iter_{t}/learner_summary.json", summary)
    return summary


def _fake_submit(cfg, run: RunDir, held_out, policy, t: int, engines=None, judges=None, timeline_t=None):
    return ("evaluation", t, timeline_t)  # the Ray task's stand-in: what collect is given


def _fake_collect(cfg, run: RunDir, held_out, t: int, ref) -> dict:
    assert ref[:2] == ("evaluation", t)
    run.write_json(f"iter_{t}/answers.json", {"answers": [f"answer {t}"] * len(held_out), "lengths": [3] * len(held_out)})
    return {"win_rate": 0.5, "win_rate_ci": [0.4, 0.6], "avg_length": 3.0, "wins": 1, "ties": 0, "losses": 1, "judge_nan": 0, "n": 2}


@pytest.fixture
def stubbed(monkeypatch, tmp_path):
    """The config of a one-iteration run in tmp_path; every stage that needs Ray stubbed."""
    monkeypatch.setattr(train, "prepare_prompts", lambda cfg, run: train.Prompts(PROMPTS[:4], PROMPTS[4:], {}))
    monkeypatch.setattr(train, "connect_ray", lambda cfg: None)
    monkeypatch.setattr(train, "initial_policy", lambda cfg, run: str(run.policy(0)))
    # engines that take every policy at once (sync_engines runs for real on them)
    monkeypatch.setattr(train, "start_engines", lambda cfg, policy, t: SimpleNamespace(shutdown=lambda: None, load=lambda p: [{"how": "storage", "seconds": 0.0}]))
    monkeypatch.setattr(train, "start_learner", lambda cfg, run: None)
    monkeypatch.setattr(train, "stream_and_train", _fake_stream_and_train)
    monkeypatch.setattr(train, "start_judges", lambda cfg: None)
    monkeypatch.setattr(train, "submit_evaluation", _fake_submit)
    monkeypatch.setattr(train, "collect_evaluation", _fake_collect)
    monkeypatch.setattr(train, "iteration_tournament", lambda cfg, run, held_out, t, judges=None, timeline_t=None: {})  # a Ray task (tests/test_tournament.py)
    monkeypatch.setattr(train, "write_report", lambda run, summary, examples: run.path / "report.md")
    _, cfg = compose(["experiment=tiny", f"run.dir={tmp_path / 'run'}", "run.iterations=1"])
    return cfg


def test_a_driver_killed_after_appending_an_iterations_records_does_not_append_them_again(stubbed, monkeypatch):
    mark_done = RunDir.mark_done

    def killed_before_eval_is_marked(run: RunDir, t: int, stage: str) -> None:
        if (t, stage) == (1, "eval"):
            raise _Killed
        mark_done(run, t, stage)

    with monkeypatch.context() as m:
        m.setattr(RunDir, "mark_done", killed_before_eval_is_marked)
        with pytest.raises(_Killed):
            train.run_sppo(stubbed)
    run = train.run_sppo(stubbed)  # the same command again

    assert run.done(1, "eval")
    assert [(m["kind"], m.get("step")) for m in run.metrics()] == [("step", 1), ("step", 2), ("timeline", None), ("iteration", None)]
    # the timeline holds the driver's own stage (π_1 to the engines; the rest is stubbed)
    timeline = run.read_json("iter_1/timeline.json")
    assert [s["name"] for s in timeline["stages"]] == ["weight_sync"] and timeline["work_s"] == 0
    assert [s["name"] for s in run.metrics()[2]["stages"]] == ["weight_sync"]


def test_the_step_checkpoints_are_removed_once_train_is_done_and_pi_t_is_kept(stubbed, monkeypatch):
    def killed_after_train(site: str) -> None:
        if site == "driver_after_train":
            raise _Killed

    def killed_in_eval(cfg, run: RunDir, held_out, t: int, ref) -> dict:
        raise _Killed

    with monkeypatch.context() as m:
        m.setattr(train, "maybe_fail", killed_after_train)
        with pytest.raises(_Killed):  # right after marking train done
            train.run_sppo(stubbed)
    checkpoints = RunDir(stubbed.run.dir).iter_dir(1) / "checkpoints"
    with monkeypatch.context() as m:
        m.setattr(train, "collect_evaluation", killed_in_eval)
        with pytest.raises(_Killed):  # the restart skips train and dies in eval
            train.run_sppo(stubbed)
    run = RunDir(stubbed.run.dir)
    assert run.done(1, "train") and run.policy(1).is_dir()
    assert not checkpoints.exists()


def test_with_evaluate_overlap_pi_t_is_evaluated_beside_the_next_stream_and_a_restart_keeps_the_order(stubbed, monkeypatch):
    _, cfg = compose(["experiment=tiny", f"run.dir={stubbed.run.dir}", "run.iterations=3", "evaluate.overlap=true"])
    events: list[tuple] = []
    submit, collect, stream = _fake_submit, _fake_collect, _fake_stream_and_train
    monkeypatch.setattr(train, "submit_evaluation", lambda *a, **k: events.append(("submit", a[4], k.get("timeline_t"))) or submit(*a, **k))
    monkeypatch.setattr(train, "collect_evaluation", lambda *a: events.append(("collect", a[3])) or collect(*a))

    def killed_in_stream_3(cfg, run, prompts, policy, t, *rest):
        if t == 3:
            raise _Killed
        events.append(("train", t))
        return stream(cfg, run, prompts, policy, t, *rest)

    monkeypatch.setattr(train, "stream_and_train", killed_in_stream_3)
    with pytest.raises(_Killed):
        train.run_sppo(cfg)
    # π_0's answers first (the run's set-up); π_1's evaluation is submitted at iteration 2's
    # start, in its timeline, and collected after its stream; the driver dies in stream 3.
    assert events == [("submit", 0, None), ("collect", 0), ("train", 1), ("submit", 1, 2), ("train", 2), ("collect", 1), ("submit", 2, 3)]
    run = RunDir(cfg.run.dir)
    assert run.done(1, "eval") and run.done(2, "train") and not run.done(2, "eval")
    first = [m for m in run.metrics() if m["kind"] == "iteration"]
    assert [(m["iteration"], m["eval_overlapped"]) for m in first] == [(1, True)]

    events.clear()
    monkeypatch.setattr(train, "stream_and_train", lambda *a: events.append(("train", a[4])) or stream(*a))
    train.run_sppo(cfg)  # the same command again: π_2's evaluation is still pending; it runs beside stream 3
    assert events == [("submit", 2, 3), ("train", 3), ("collect", 2), ("submit", 3, None), ("collect", 3)]
    records = [m for m in run.metrics() if m["kind"] == "iteration"]
    assert [(m["iteration"], m["eval_overlapped"]) for m in records] == [(1, True), (2, True), (3, False)]


def test_slices_that_wrap_around_the_training_prompts_are_warned_about_and_reported(tmp_path, caplog):
    # The tiny set: 64 prompts, 16 held out → 48 train. 30 per iteration × 2 iterations = 60
    # prompts drawn, 48 distinct: 12 repeat a prompt of iteration 1.
    _, cfg = compose(["experiment=tiny", f"run.dir={tmp_path / 'run'}", "run.iterations=2", "data.prompts_per_iteration=30"])
    with caplog.at_level("WARNING", logger="spo_ray"):
        prompts = train.prepare_prompts(cfg, RunDir(cfg.run.dir))
    assert len(prompts.train) == 48 and (prompts.reuse.drawn, prompts.reuse.distinct, prompts.reuse.repeated) == (60, 48, 12)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("data.prompts_per_iteration=30 × run.iterations=2 = 60 > the 48 training prompts" in m and "12 of the 60" in m for m in warned)
    assert "12 of the 60" in train.config_summary(cfg, prompts.reuse)["prompt reuse"]


def test_new_slices_every_iteration_are_not_reported(tmp_path, caplog):
    _, cfg = compose(["experiment=tiny", f"run.dir={tmp_path / 'run'}", "run.iterations=2", "data.prompts_per_iteration=24"])
    with caplog.at_level("WARNING", logger="spo_ray"):
        prompts = train.prepare_prompts(cfg, RunDir(cfg.run.dir))
    assert prompts.reuse is None and not [r for r in caplog.records if r.levelname == "WARNING"]
    assert "prompt reuse" not in train.config_summary(cfg, prompts.reuse)
