"""Killing the driver in each phase of an iteration, then starting the same command with the
same run.dir: `python -m spo_ray.train experiment=tiny cluster.address=local run.dir=D`.

One chain keeps CI time down: SIGKILL during generation → restart, SIGKILL during training
(after a step checkpoint) → restart, the driver exits right after the manifest says `train`
(fault `driver_after_train@1`) → restart, which finishes. Each kill takes the driver's whole
process group — its local Ray — with it, as a lost head node would (never `ray stop`: other
clusters may run on this machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spo_ray.faults import EXIT_CODE, fired
from spo_ray.learner.resume import latest_checkpoint, persisted_rows
from spo_ray.run_dir import RunDir, persisted_prompt_ids
from tests.conftest import REPO
from tests.fault_report import record_fault

N_PROMPTS = 8
CMD = [
    "experiment=tiny", "cluster.address=local", "run.iterations=1",
    f"data.prompts_per_iteration={N_PROMPTS}", "data.num_eval=4",
    "rollout.num_samples=3", "rollout.max_new_tokens=12", "evaluate.max_new_tokens=12",
    "learner.micro_batch_size=2", "learner.global_batch_size=4", "learner.checkpoint_every=1",
]
STREAMING = "[spo_ray] iteration 1/1: streaming"
WAIT_S = 600  # per phase; a 2-CPU machine under load is slow to start Ray and the trainer


def _launch(run_dir: Path, log: Path, **env) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPO_RAY_FAULT")} | env
    # cluster.address=local starts its own Ray whatever RAY_ADDRESS (or a stale cluster file) says.
    env.setdefault("RAY_ADDRESS", "127.0.0.1:9")
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "spo_ray.train", f"run.dir={run_dir}", *CMD],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )


def _session_pids(session: int) -> list[int]:
    """Live (not zombie) processes of the driver's session: the driver and its local Ray,
    whose workers each run in a process group of their own (so killpg misses them)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process is gone
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _stop(proc: subprocess.Popen) -> None:
    """SIGKILL the driver's whole session (its local Ray too) and wait until it is gone, so
    no orphaned learner worker writes into the run dir after the test reads it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.time() + 60
    while pids := _session_pids(proc.pid):
        assert time.time() < deadline, f"processes {pids} of session {proc.pid} survived SIGKILL for 60 s"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def _kill_when(proc: subprocess.Popen, log: Path, ready, what: str) -> float:
    """SIGKILL the driver's process group as soon as `ready()` holds; returns the seconds it ran."""
    start, deadline = time.time(), time.time() + WAIT_S
    try:
        while not ready():
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}"
            assert time.time() < deadline, f"no {what} after {WAIT_S}s:\n{log.read_text()[-4000:]}"
            time.sleep(0.1)
    finally:
        _stop(proc)
    return time.time() - start


def _finish(proc: subprocess.Popen, log: Path) -> float:
    """Wait for the driver to end by itself, then clear what is left of its process group."""
    start = time.time()
    try:
        proc.wait(timeout=WAIT_S)
    finally:
        _stop(proc)
    return time.time() - start


@pytest.mark.fault
def test_driver_killed_in_each_phase_resumes_without_regenerating_or_repeating(tmp_path):
    run_dir, faults = tmp_path / "run", tmp_path / "faults"
    run = RunDir(run_dir)
    it = run.iter_dir(1)
    logs = [tmp_path / f"launch{i}.log" for i in range(4)]

    # (a) generation: iteration 1's stream has started, no step has been taken
    seconds_a = _kill_when(_launch(run_dir, logs[0]), logs[0], lambda: STREAMING in logs[0].read_text(), "stream start")
    assert not run.done(1, "train") and not run.read_jsonl("iter_1/train_metrics.jsonl")

    # (b) training: a step checkpoint is finished (rows stream on behind it)
    seconds_b = _kill_when(_launch(run_dir, logs[1]), logs[1], lambda: latest_checkpoint(it) is not None, "step checkpoint")
    assert not run.done(1, "train"), "killed too late: the train stage had finished"
    before = {p: p.stat().st_mtime_ns for p in it.glob("*/part-*.parquet")}
    persisted_at_kill = persisted_prompt_ids(it)
    position = json.loads((latest_checkpoint(it) / "position.json").read_text())
    assert position["step"] >= 1

    # (c) after the train stage is marked done, before evaluation
    third = _launch(run_dir, logs[2], SPO_RAY_FAULT="driver_after_train@1", SPO_RAY_FAULT_DIR=str(faults))
    seconds_c = _finish(third, logs[2])
    assert third.returncode == EXIT_CODE and fired("driver_after_train", faults), logs[2].read_text()[-4000:]
    assert run.done(1, "train") and not run.done(1, "eval")
    summary = run.read_json("iter_1/learner_summary.json")
    # the restarted learner loaded the checkpoint, replayed what was persisted after it, and
    # streamed only the prompts never persisted: nothing was generated twice
    assert summary["resumed_from_step"] == position["step"]
    assert summary["streamed_rows"] == N_PROMPTS - len(persisted_at_kill)
    replayed = len(persisted_at_kill) - len(position["consumed"]) if position["epoch"] == 0 else 0  # epoch 1 was done
    assert summary["replayed_rows"] == replayed
    assert {p: p.stat().st_mtime_ns for p in before} == before  # earlier parts untouched

    # the last restart only evaluates and reports
    fourth = _launch(run_dir, logs[3])
    seconds_d = _finish(fourth, logs[3])
    assert fourth.returncode == 0, logs[3].read_text()[-4000:]
    out = logs[3].read_text()
    assert STREAMING not in out and "[spo_ray] done" in out
    assert run.manifest()["iter_1"] == ["train", "eval"] and (it / "eval.json").exists()
    assert run.read_json("iter_1/learner_summary.json") == summary

    # final counts: every prompt of the iteration exactly once (pair or counted skip), each
    # trained once per epoch, as a clean run gives
    expected = sorted(run.read_json("split.json")["train"][:N_PROMPTS])
    ids = [r["prompt_id"] for r in persisted_rows(it)]
    lost, repeated = len(set(expected) - set(ids)), len(ids) - len(set(ids))
    assert lost == repeated == 0 and sorted(ids) == expected
    assert summary["rows"] == N_PROMPTS == summary["pairs"] + sum(summary["skipped"].values())
    steps = run.read_jsonl("iter_1/train_metrics.jsonl")
    assert [s["step"] for s in steps] == list(range(1, summary["steps"] + 1))
    pairs = sorted(r["prompt_id"] for r in persisted_rows(it) if not r["skip_reason"])
    for epoch, trained_once in ((0, expected), (1, pairs)):
        assert sorted(i for s in steps if s["epoch"] == epoch for i in s["prompt_ids"]) == trained_once
    assert not list(it.glob("checkpoints/.tmp-*"))

    for phase, killed_after, resume_s in (
        ("generation", seconds_a, None), ("training", seconds_b, None), ("after train, before eval", seconds_c, seconds_d)
    ):
        record_fault(
            "driver SIGKILL" if phase != "after train, before eval" else "driver exits (driver_after_train@1)",
            phase, recovered=True, prompts_lost=lost, prompts_repeated=repeated, extra_s=None,
            killed_after_s=round(killed_after, 1), resume_s=None if resume_s is None else round(resume_s, 1),
        )
