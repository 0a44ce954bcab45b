"""spo_ray.faults: a fault fires at the n-th arrival, kills the process at once, and only once."""

from __future__ import annotations

import json
import subprocess
import sys

from spo_ray.faults import EXIT_CODE, SPEC_FILE, fired, reset
from tests.conftest import REPO
from tests.fault_report import REPORT_ENV, record_fault

REACH = "from spo_ray.faults import maybe_fail\nfor i in range({n}):\n    maybe_fail('site')\n    print(i, flush=True)\n"


def _reach(n: int, spec: str | None, folder) -> subprocess.CompletedProcess:
    env = {"SPO_RAY_FAULT_DIR": str(folder), "PATH": "/usr/bin:/bin"}
    if spec is not None:
        env["SPO_RAY_FAULT"] = spec
    return subprocess.run([sys.executable, "-c", REACH.format(n=n)], env=env, capture_output=True, text=True, cwd=REPO)


def test_fault_fires_at_the_nth_arrival_then_never_again(tmp_path):
    first = _reach(5, "other@1,site@3", tmp_path)
    assert first.returncode == EXIT_CODE
    assert first.stdout.split() == ["0", "1"]  # arrivals 1 and 2 pass, the 3rd exits before printing
    assert fired("site", tmp_path) and not fired("other", tmp_path)
    again = _reach(5, "site@3", tmp_path)  # the replacement process goes on
    assert again.returncode == 0 and again.stdout.split() == ["0", "1", "2", "3", "4"]


def test_no_fault_without_the_variable(tmp_path):
    done = subprocess.run([sys.executable, "-c", REACH.format(n=3)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, cwd=REPO)
    assert done.returncode == 0 and done.stdout.split() == ["0", "1", "2"]


def test_spec_file_arms_a_fault_when_the_variable_is_unset(tmp_path):
    assert _reach(3, None, tmp_path).returncode == 0  # a fault dir without a spec: no fault
    (tmp_path / SPEC_FILE).write_text("site@2\n")
    armed = _reach(3, None, tmp_path)
    assert armed.returncode == EXIT_CODE and armed.stdout.split() == ["0"] and fired("site", tmp_path)
    reset(tmp_path)  # counts and markers gone: the same spec fires again
    assert not fired("site", tmp_path) and _reach(3, None, tmp_path).returncode == EXIT_CODE
    # the variable wins over the file
    reset(tmp_path)
    assert _reach(3, "other@1", tmp_path).returncode == 0


def test_arm_fault_reaches_ray_workers_of_the_shared_session(ray_session, arm_fault):
    """The shared Ray's workers read the spec file: the task's first try dies, its retry runs."""
    import os

    import ray

    from spo_ray.faults import maybe_fail

    @ray.remote(num_cpus=0.25, max_retries=1)
    def probe() -> int:
        maybe_fail("probe")
        return os.getpid()

    with arm_fault("probe@1") as folder:
        ray.get(probe.remote(), timeout=120)
        assert fired("probe", folder)
    assert not (folder / SPEC_FILE).exists()
    reset(folder)
    ray.get(probe.remote(), timeout=120)  # disarmed: runs once, fires nothing
    assert not fired("probe", folder)


def test_record_fault_appends_json_lines_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(REPORT_ENV, raising=False)
    record_fault("x", "generation", True, 0, 0, 1.0)  # no-op
    report = tmp_path / "chaos.jsonl"
    monkeypatch.setenv(REPORT_ENV, str(report))
    record_fault("rollout actor exits", "generation", True, 0, 0, 3.14159, faulted_s=10.0)
    record_fault("driver killed", "training", False, 2, 1, None)
    rows = [json.loads(l) for l in report.read_text().splitlines()]
    assert rows[0] == dict(fault="rollout actor exits", phase="generation", recovered=True, prompts_lost=0,
                           prompts_repeated=0, extra_s=3.1, faulted_s=10.0)
    assert rows[1]["recovered"] is False and rows[1]["extra_s"] is None
