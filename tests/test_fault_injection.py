"""spo_ray.faults: a fault fires at the n-th arrival, kills the process at once, and only once."""

from __future__ import annotations

import subprocess
import sys

from spo_ray.faults import EXIT_CODE, fired
from tests.conftest import REPO

REACH = "from spo_ray.faults import maybe_fail\nfor i in range({n}):\n    maybe_fail('site')\n    print(i, flush=True)\n"


def _reach(n: int, spec: str, folder) -> subprocess.CompletedProcess:
    env = {"SPO_RAY_FAULT": spec, "SPO_RAY_FAULT_DIR": str(folder), "PATH": "/usr/bin:/bin"}
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
