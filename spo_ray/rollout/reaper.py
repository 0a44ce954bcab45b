"""A watchdog that kills a process's descendants once that process is gone.

A vLLM engine runs in several processes: the `vllm.LLM` owner (here: an `EngineActor` or
any script), its EngineCore and one worker per tensor-parallel rank. `VLLMEngine.shutdown`
stops them; but an owner that dies without it (`os._exit`, SIGKILL, a Ray actor killed or
crashed) leaves EngineCore and workers running, each holding the model and its KV cache
(several GB). So every VLLMEngine starts one of these next to it:

    python -m spo_ray.rollout.reaper OWNER_PID INTERVAL_S [IGNORED_PID ...]

It is the owner's child, in a session of its own (a signal to the owner's process group
does not reach it). Every INTERVAL_S it notes the owner's descendants (pid and start time)
except the subtrees of the children the owner had already when it started the watchdog
(in a driver those are Ray's own processes, which are not the engine's to kill);
when its parent is no longer the owner (the owner died and the watchdog was re-parented),
it SIGKILLs every noted process that still runs with the same start time (a recycled pid
is left alone), then exits. `Reaper.stop` ends it when the owner shuts down cleanly.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import psutil

log = logging.getLogger(__name__)


def descendants(owner: psutil.Process, ignored: set[int]) -> dict[int, float]:
    """pid → start time of every process below `owner`, except the subtrees of the
    children in `ignored`."""
    found = {}
    for child in owner.children():
        if child.pid in ignored:
            continue
        try:
            found[child.pid] = child.create_time()
            found.update((p.pid, p.create_time()) for p in child.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return found


def kill_noted(noted: dict[int, float]) -> list[int]:
    """SIGKILL each noted process still alive with the start time it had; the pids killed."""
    killed = []
    for pid, started in noted.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == started:
                proc.send_signal(signal.SIGKILL)
                killed.append(pid)
        except psutil.NoSuchProcess:
            pass
    return killed


def watch(owner_pid: int, interval_s: float, ignored: set[int]) -> list[int]:
    """Note the owner's descendants until the owner is gone, then kill them."""
    owner = psutil.Process(owner_pid)
    ignored = ignored | {os.getpid()}
    noted: dict[int, float] = {}
    while os.getppid() == owner_pid:
        try:
            noted = descendants(owner, ignored)
        except psutil.NoSuchProcess:
            break
        time.sleep(interval_s)
    return kill_noted(noted)


class Reaper:
    """The watchdog of the calling process (see the module docstring)."""

    def __init__(self, interval_s: float = 1.0) -> None:
        existing = [str(child.pid) for child in psutil.Process().children()]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spo_ray.rollout.reaper", str(os.getpid()), str(interval_s), *existing],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop(self) -> None:
        """The owner cleaned up itself: end the watchdog (it kills nothing)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def main(argv: list[str]) -> None:
    owner_pid, interval_s, ignored = int(argv[0]), float(argv[1]), {int(pid) for pid in argv[2:]}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    killed = watch(owner_pid, interval_s, ignored)
    if killed:
        print(f"spo_ray reaper: owner {owner_pid} is gone; killed its processes {killed}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
