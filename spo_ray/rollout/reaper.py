"""A watchdog that kills the processes an engine started once the engine's owner is gone.

A vLLM engine runs in several processes: the `vllm.LLM` owner (here: an `EngineActor` or
any script), its EngineCore and one worker per tensor-parallel rank. `VLLMEngine.shutdown`
stops them; but an owner that dies without it (`os._exit`, SIGKILL, a Ray actor killed or
crashed) leaves EngineCore and workers running, each holding the model and its KV cache
(several GB). So every VLLMEngine starts one of these next to it:

    python -m spo_ray.rollout.reaper OWNER_PID INTERVAL_S

It is the owner's child, in a session of its own (a signal to the owner's process group
does not reach it). The owner names the processes to watch on the watchdog's stdin
(`Reaper.track`: one "pid start_time" line each, the children that building the engine
started); every INTERVAL_S the watchdog notes them and their descendants. When the owner is
gone — its end of the stdin pipe closes, which the kernel does however the owner died, or
the watchdog's parent changes — it SIGKILLs every noted process that still runs with the
start time it had (a recycled pid is left alone), then exits. `Reaper.stop` ends it when the
owner shuts the engine down itself.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

import psutil

log = logging.getLogger(__name__)


def noted_tree(roots: dict[int, float]) -> dict[int, float]:
    """pid → start time of each root still running as itself, and of its descendants."""
    found = {}
    for pid, started in roots.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() != started:
                continue
            found[pid] = started
            found.update((p.pid, p.create_time()) for p in proc.children(recursive=True))
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


def watch(owner_pid: int, interval_s: float, lines) -> list[int]:
    """Track the pids named on `lines` until the owner is gone, then kill them and theirs."""
    roots: dict[int, float] = {}
    gone = threading.Event()

    def read() -> None:
        for line in lines:
            pid, started = line.split()
            roots[int(pid)] = float(started)
        gone.set()  # EOF: the owner closed the pipe, or died

    threading.Thread(target=read, daemon=True).start()
    noted: dict[int, float] = {}
    while not gone.is_set() and os.getppid() == owner_pid:
        noted = noted_tree(dict(roots))
        gone.wait(interval_s)
    return kill_noted({**noted, **noted_tree(dict(roots))})


class Reaper:
    """The watchdog of the calling process (see the module docstring)."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spo_ray.rollout.reaper", str(os.getpid()), str(interval_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )

    def track(self, pids: set[int]) -> None:
        """Watch these processes (and what they start) from now on."""
        lines = []
        for pid in pids:
            try:
                lines.append(f"{pid} {psutil.Process(pid).create_time()}\n")
            except psutil.NoSuchProcess:
                pass
        try:
            self.proc.stdin.write("".join(lines))
            self.proc.stdin.flush()
        except OSError as err:  # the watchdog itself died: the engine works, unguarded
            log.warning("the engine's watchdog (pid %d) is gone (%s): its processes are not guarded", self.proc.pid, err)

    def stop(self) -> None:
        """The owner cleaned up itself: end the watchdog (it kills nothing)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.stdin.close()


def children() -> set[int]:
    """The calling process's direct children."""
    return {child.pid for child in psutil.Process().children()}


def main(argv: list[str]) -> None:
    owner_pid, interval_s = int(argv[0]), float(argv[1])
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    killed = watch(owner_pid, interval_s, sys.stdin)
    if killed:
        print(f"spo_ray reaper: owner {owner_pid} is gone; killed its engine's processes {killed}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
