"""Where an iteration's time goes: busy intervals recorded where the work happens, merged
by the driver into `iter_<t>/timeline.json` at the end of the iteration.

    {"wall_s": 224.1, "work_s": 91.3, "overhead_s": 132.8,
     "stages": [{"name": "generation", "start_s": 31.2, "end_s": 120.4, "busy_s": 44.9,
                 "intervals": [[31.2, 36.0], ...]}, ...]}

Times are seconds from the iteration's start. A stage's `busy_s` is the union of its
intervals (two rollout actors generating at once count once); `work_s` is the union of the
intervals of the stages in WORK_STAGES, so overlapping work is not counted twice, and
`wall_s − work_s` (`overhead_s`) is what the iteration spent starting, loading, saving,
syncing and waiting.

Recording: each process (a Ray Data stage actor, a Ray Train worker, the evaluation task,
the driver) appends `{"name", "start", "end"}` lines of `time.time()` stamps to a file of its
own under `iter_<t>/timeline_parts/` (`record_interval`, `span`), one line per batch, step or
stage start, never per token. No tensors and no Ray objects are involved, and nothing needs to
flow back through the driver. `time.time()` is the machine clock shared by all processes on
one node; across nodes the timeline assumes their clocks are synchronized (NTP), as Ray's
own timeline does.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from spo_ray.run_dir import RunDir, read_json_lines, write_json_atomic

log = logging.getLogger(__name__)

# The stages in the order of the chart's rows, with what each interval covers and who records it.
STAGES: dict[str, str] = {
    "rollout_start": "a stream's RolloutStage is built: an actor that loads its engine, or a task's client of the run's engines (Ray Data)",
    "generation": "a RolloutStage batch: K samples per prompt (Ray Data actor or task)",
    "judge_start": "a stream's JudgeStage is built: an actor that loads its judge, or a task's client of the run's judges (Ray Data)",
    "judging": "a JudgeStage batch: K×K preferences and pair selection (Ray Data actor or task)",
    "learner_workers": "from the trainer's fit() to a learner worker's first line (Ray Train)",
    "learner_models": "policy, reference and DeepSpeed engine built (Ray Train worker)",
    "learner_reset": "persistent learner: π_t into the reference, fresh optimizer and LR schedule (Ray Train worker)",
    "learner_wait": "a learner worker waits for its next rows, or for the stream's end (Ray Train worker)",
    "learner_step": "one optimizer step: forward/backward of its micro-batches (Ray Train worker)",
    "learner_checkpoint": "a step checkpoint saved for resume (Ray Train worker)",
    "save_policy": "π_t gathered and saved as an HF folder (Ray Train worker)",
    "weight_sync": "π_t reaches the rollout engines: the learner's broadcast, the engines' reload (worker, driver)",
    "eval_start": "from the evaluation task's submission until it has loaded π_t and the judge (Ray task)",
    "evaluation": "held-out answers of π_t and their judging (Ray task)",
    "tournament": "every pair of π_0 … π_t judged on the stored held-out answers (Ray task)",
}
# Useful work; everything else is overhead.
WORK_STAGES = frozenset({"generation", "judging", "learner_step", "evaluation", "tournament"})


@dataclass(frozen=True)
class Interval:
    """One busy interval of a stage, in `time.time()` seconds."""

    name: str
    start: float
    end: float


def record_interval(parts_dir: str | Path | None, name: str, start: float, end: float) -> None:
    """Append one interval to this process's file in `parts_dir` (None: not recording)."""
    if parts_dir is None:
        return
    folder = Path(parts_dir)
    folder.mkdir(parents=True, exist_ok=True)
    # One file per process: appends never interleave with another process's; the host name
    # keeps two nodes' equal pids apart on shared storage.
    path = folder / f"{socket.gethostname()}-{os.getpid()}.jsonl"
    with path.open("a") as f:
        f.write(json.dumps({"name": name, "start": start, "end": end}) + "\n")


@contextmanager
def span(parts_dir: str | Path | None, name: str) -> Iterator[None]:
    """Record the body's wall-clock interval as busy time of `name`, if it finishes: a body
    that raises did no useful work and its time stays overhead."""
    start = time.time()
    yield
    record_interval(parts_dir, name, start, time.time())


def read_intervals(parts_dir: str | Path) -> list[Interval]:
    """Every interval recorded in `parts_dir` ([] when nothing was). A last line cut short
    (a process killed mid-append) is dropped."""
    return [
        Interval(r["name"], r["start"], r["end"])
        for path in sorted(Path(parts_dir).glob("*.jsonl"))
        for r in read_json_lines(path)
    ]


def union(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Overlapping or touching intervals merged, sorted by start."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def build_timeline(intervals: Iterable[Interval], start: float, end: float) -> dict:
    """The iteration's timeline from its recorded intervals and the driver's [start, end].

    The iteration's window is [start, end], widened to cover every recorded interval (a
    driver restarted after the `train` stage finished keeps that stage's intervals from the
    earlier attempt, and its wall time then includes the restart), so every stage lies
    inside it. Stages are ordered as in STAGES (unknown names after them, by name).
    """
    intervals = list(intervals)
    bad = [i for i in intervals if i.end < i.start]
    if bad:
        log.warning("timeline: %d intervals end before they start (e.g. %s); left out", len(bad), bad[0])
        intervals = [i for i in intervals if i.end >= i.start]
    start = min([start, *(i.start for i in intervals)])
    end = max([end, *(i.end for i in intervals)])
    rel = lambda x: round(x - start, 3)  # noqa: E731 - round() is monotonic: the invariants survive it
    order = {name: n for n, name in enumerate(STAGES)}
    names = sorted({i.name for i in intervals}, key=lambda name: (order.get(name, len(order)), name))
    stages = []
    for name in names:
        spans = [[rel(a), rel(b)] for a, b in union((i.start, i.end) for i in intervals if i.name == name)]
        stages.append(
            {
                "name": name,
                "start_s": spans[0][0],
                "end_s": spans[-1][1],
                # from the rounded intervals, so that the bars drawn add up to busy_s
                "busy_s": round(sum(b - a for a, b in spans), 3),
                "intervals": spans,
            }
        )
    work = union((i.start, i.end) for i in intervals if i.name in WORK_STAGES)
    wall_s, work_s = round(end - start, 3), round(sum(b - a for a, b in work), 3)
    return {"wall_s": wall_s, "work_s": work_s, "overhead_s": round(wall_s - work_s, 3), "stages": stages}


def write_timeline(run: RunDir, t: int, start: float, end: float | None = None) -> dict:
    """Merge iteration t's recorded intervals into `iter_<t>/timeline.json`; returns it
    (`end` defaults to now)."""
    timeline = build_timeline(read_intervals(run.timeline_parts(t)), start, time.time() if end is None else end)
    write_json_atomic(run.timeline(t), timeline)
    return timeline


def biggest_overheads(timeline: dict, k: int = 3) -> list[tuple[str, float]]:
    """The `k` non-work stages with the most busy time, for the end-of-iteration line."""
    overhead = [(s["name"], s["busy_s"]) for s in timeline["stages"] if s["name"] not in WORK_STAGES]
    return sorted(overhead, key=lambda x: -x[1])[:k]
