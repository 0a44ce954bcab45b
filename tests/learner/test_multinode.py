"""The learner on two nodes (tests/learner/two_node_cluster.py: a Ray Cluster made on this machine,
one learner worker per node), in a process of its own: it cannot share the session's Ray.

- Ranks that list the shared run dir differently (one node's directory cache is stale)
  still resume from the same rows: rank 0 decides, the others read what it names
  (spo_ray/learner/resume.py). Before, the ranks replayed different rows, lost a prompt
  and ran different numbers of steps, so the collectives hung.
- A node lost mid-iteration (a preempted spot node, replaced): the iteration finishes from
  its step checkpoint with every prompt exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spo_ray.learner.resume import persisted_rows
from spo_ray.run_dir import RunDir
from tests.conftest import REPO
from tests.fault_report import record_fault
from tests.test_driver_kill import _stop
from tests.learner.two_node_cluster import (
    N_PROMPTS, NEW_PART, OLD_PART, STALE_CUTOFF_ENV, STALE_ROOT_ENV, earlier_attempt, stale_listing_on_rank_1
)

WAIT_S = 300  # a healthy run takes about a minute; a hung collective would wait 30 min


def _two_node_run(scenario: str, run_dir: Path, policy: str) -> dict:
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log = run_dir.parent / f"{scenario}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.learner.two_node_cluster", scenario, str(run_dir), policy],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        proc.wait(WAIT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        _stop(proc)  # the driver's session: its Cluster's raylets and workers too
    lines = [l for l in log.read_text().splitlines() if l.startswith("RESULT ")]
    assert lines, f"{scenario}: no result within {WAIT_S} s (hung?); log {log}:\n" + log.read_text()[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def _trained_per_epoch(run: RunDir) -> list[str]:
    return [i for s in run.read_jsonl("iter_1/train_metrics.jsonl") for i in s["prompt_ids"]]


def test_the_simulated_stale_listing_hides_the_newer_part_from_rank_1_only(tmp_path, monkeypatch):
    from spo_ray.data.prompts import load_prompts

    prompts = load_prompts("tiny_prompts", "builtin", "prompt", "prompt_id").rows
    cutoff = earlier_attempt(tmp_path, prompts)
    monkeypatch.setenv(STALE_CUTOFF_ENV, str(cutoff))
    monkeypatch.setenv(STALE_ROOT_ENV, str(tmp_path))
    monkeypatch.setattr(Path, "glob", Path.glob)  # restored after the test
    stale_listing_on_rank_1()
    for rank, visible in (("0", OLD_PART + NEW_PART), ("1", OLD_PART)):
        monkeypatch.setenv("RANK", rank)
        assert len(persisted_rows(tmp_path)) == visible


def test_ranks_with_different_listings_resume_from_rank_0s(tiny_policy, tmp_path):
    """Rank 1 lists only the older of two persisted parts. Before rank 0 decided, rank 1
    replayed 2 of the 4 old rows while rank 0 replayed 3 of all 6: rank 0 trained on while
    rank 1 waited for the stream, and the run hung (no result in 300 s)."""
    result = _two_node_run("stale_listing", tmp_path / "run", tiny_policy)
    assert "error" not in result, result["error"]
    run = RunDir(tmp_path / "run")
    summary = result["summary"]
    assert summary["replayed_rows"] == OLD_PART + NEW_PART  # rank 1 replayed the part it could not list
    assert summary["rows"] == N_PROMPTS and summary["streamed_rows"] == N_PROMPTS - OLD_PART - NEW_PART
    ids = [r["prompt_id"] for r in persisted_rows(run.iter_dir(1))]
    assert len(ids) == len(set(ids)) == N_PROMPTS
    assert sorted(_trained_per_epoch(run)) == sorted(ids)  # each prompt trained once, none lost


@pytest.mark.fault
def test_a_node_lost_mid_iteration_is_replaced_and_the_iteration_finishes_exactly(tiny_policy, tmp_path):
    result = _two_node_run("node_lost", tmp_path / "run", tiny_policy)
    run = RunDir(tmp_path / "run")
    ids = [r["prompt_id"] for r in persisted_rows(run.iter_dir(1))]
    lost, repeated = N_PROMPTS - len(set(ids)), len(ids) - len(set(ids))
    record_fault(
        "worker node lost (raylet and its workers SIGKILLed, a learner worker among them; a replacement node joins)",
        f"training (after step {result.get('removed_at_step')}, stream still generating)", recovered="error" not in result,
        prompts_lost=lost, prompts_repeated=repeated, extra_s=None, faulted_s=result["seconds"],
        outcome=result.get("error", ""),
    )
    assert "removed_at_step" in result, "the node was never removed: the test proves nothing"
    assert "error" not in result, result["error"]
    assert lost == repeated == 0
    summary = result["summary"]
    assert summary["steps"] > summary["resumed_from_step"] >= result["removed_at_step"] >= 1  # lost mid-iteration
    assert sorted(_trained_per_epoch(run)) == sorted(ids)
