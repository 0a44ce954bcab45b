"""Fault injection for the fault-tolerance tests and `make chaos` (off unless asked for).

    SPO_RAY_FAULT="<site>@<n>[,<site>@<n>...]"   SPO_RAY_FAULT_DIR=/some/shared/dir

makes the process that reaches `site` for the n-th time (counted across all processes of
the run, on one machine) exit at once with code 17 — the way a lost node, an OOM kill or a
SIGKILL ends it: no exception handler, no cleanup. Each fault fires once per fault dir (a
marker file records it), so the replacement actor, the restarted worker or the resumed
run goes on. Sites are named where `maybe_fail` is called, e.g. `rollout_batch`,
`judge_batch`, `engine_generate`, `learner_step`, `driver_after_train`.

The variables reach Ray's workers through the job's runtime_env (`fault_env`, used by
`spo_ray.train.connect_ray`). When SPO_RAY_FAULT is unset but SPO_RAY_FAULT_DIR is set,
the spec is read from the file `<fault dir>/spec` at each arrival, so tests that share one
running Ray can arm a fault (write the file), run, and disarm it (remove the file) without
restarting Ray (tests/conftest.py: `arm_fault`).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

FAULT_ENV = "SPO_RAY_FAULT"
FAULT_DIR_ENV = "SPO_RAY_FAULT_DIR"
SPEC_FILE = "spec"
EXIT_CODE = 17


def fault_env() -> dict[str, str]:
    """The fault variables of this process, to forward to Ray workers ({} when none)."""
    return {k: os.environ[k] for k in (FAULT_ENV, FAULT_DIR_ENV) if os.environ.get(k)}


def _spec() -> str:
    """The fault spec: SPO_RAY_FAULT, else the file `<SPO_RAY_FAULT_DIR>/spec` ("" if neither)."""
    if os.environ.get(FAULT_ENV):
        return os.environ[FAULT_ENV]
    folder = os.environ.get(FAULT_DIR_ENV)
    if not folder:
        return ""
    try:
        return (Path(folder) / SPEC_FILE).read_text().strip()
    except FileNotFoundError:
        return ""


def _threshold(site: str) -> int | None:
    for item in _spec().split(","):
        name, _, n = item.strip().partition("@")
        if name == site:
            return int(n or 1)
    return None


def maybe_fail(site: str) -> None:
    """Count one arrival at `site`; exit the process if a fault asks for it here and now."""
    n = _threshold(site)
    if n is None:
        return
    folder = Path(os.environ.get(FAULT_DIR_ENV) or "/tmp/spo_ray_faults")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{site}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        counter, fired = folder / f"{site}.count", folder / f"{site}.fired"
        count = int(counter.read_text() or 0) + 1 if counter.exists() else 1
        counter.write_text(str(count))
        if count < n or fired.exists():
            return
        fired.write_text(f"pid {os.getpid()} at arrival {count}\n")
    os._exit(EXIT_CODE)


def fired(site: str, folder: str | os.PathLike) -> bool:
    """Whether the fault at `site` has fired (for tests: a fault that never fired proves nothing)."""
    return (Path(folder) / f"{site}.fired").exists()


def reset(folder: str | os.PathLike) -> None:
    """Forget every arrival count and fired marker in `folder` (the spec file stays)."""
    for path in Path(folder).glob("*"):
        if path.suffix in (".count", ".fired", ".lock"):
            path.unlink(missing_ok=True)
