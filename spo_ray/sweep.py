"""Hydra sweeps: `python -m spo_ray.train -m experiment=tiny learner.lr=1e-6,5e-7 learner.loss=sppo,dpo`.

Every point of a sweep runs in the same driver process, so it reuses that process's Ray
connection (`connect_ray` returns early once Ray is up): all points share one cluster, one
after another. Each point gets its own run dir, `<hydra.sweep.dir>/<n>` (`sweep_run_dir`),
with its resolved `config.yaml` and all the usual artifacts. After each point the
`SweepSummary` callback (registered under `hydra.callbacks` in conf/config.yaml) rewrites

    <hydra.sweep.dir>/sweep_summary.csv   one row per point
    <hydra.sweep.dir>/sweep_summary.md    the same as a Markdown table

from the `sweep_point.json` each point leaves in its dir, so the summary is complete even
when a point fails (the sweep goes on; Hydra raises at the end) or the sweep is resumed.
Resume a sweep by running it again with `hydra.sweep.dir=<its dir>`: point n finds its run
dir and continues after its last finished stage.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from spo_ray.run_dir import RunFiles, read_json_lines, write_json_atomic, write_text_atomic

log = logging.getLogger("spo_ray")

POINT_FILE = "sweep_point.json"
COLUMNS = ("job", "overrides", "status", "iterations", "win_rate", "ci_low", "ci_high", "wall_s", "run_dir", "error")


def sweep_run_dir(run_dir: str) -> str:
    """The run dir of this Hydra job: `run_dir` for a single run; for a sweep point its own
    job dir, `<hydra.sweep.dir>/<n>` (points must not share a run dir: it would resume)."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return run_dir
    if any(o.split("=", 1)[0].lstrip("+~") == "run.dir" for o in hydra_cfg.overrides.task):
        raise ValueError(
            "run.dir cannot be set in a sweep (-m): each point runs in <hydra.sweep.dir>/<n>; "
            "pass hydra.sweep.dir=... to choose (or resume) the sweep's directory"
        )
    return hydra_cfg.runtime.output_dir


def point_record(run_dir: Path, job: int, overrides: list[str], status: str, wall_s: float, error: str = "") -> dict[str, Any]:
    """One summary row: the point's final iteration from its metrics.jsonl (if it got that far)."""
    last: dict[str, Any] = {}
    for record in read_json_lines(RunFiles(run_dir).metrics):
        if record.get("kind") == "iteration":
            last = record
    ci = last.get("win_rate_ci") or [None, None]
    return {
        "job": job,
        "overrides": " ".join(overrides),
        "status": status,
        "iterations": last.get("iteration", 0),
        "win_rate": last.get("win_rate"),
        "ci_low": ci[0],
        "ci_high": ci[1],
        "wall_s": round(wall_s, 1),
        "run_dir": str(run_dir),
        "error": error,
    }


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """(Re)write sweep_summary.csv and .md from every point's record under `sweep_dir`."""
    rows = sorted(
        (json.loads(p.read_text()) for p in sweep_dir.glob(f"*/{POINT_FILE}")), key=lambda r: r["job"]
    )
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(sweep_dir / "sweep_summary.csv", table.getvalue())
    write_text_atomic(sweep_dir / "sweep_summary.md", _markdown(rows))
    return rows


def _markdown(rows: list[dict[str, Any]]) -> str:
    """The table shows what differs between points; the overrides they share come first."""

    def num(value: Any, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    per_row = [r["overrides"].split() for r in rows]
    common = [o for o in per_row[0] if all(o in other for other in per_row[1:])] if len(rows) > 1 else []
    lines = [
        "# Sweep summary",
        "",
        "Final win rate of π_T against π_0 on the held-out prompts, with its 95 % interval.",
        "",
    ]
    if common:
        lines += [f"Every point: `{' '.join(common)}`", ""]
    lines += [
        "| # | overrides | status | iterations | win rate | 95 % CI | wall time | run dir |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r, overrides in zip(rows, per_row):
        varying = " ".join(o for o in overrides if o not in common) or "–"
        ci = f"[{num(r['ci_low'], '.3f')}, {num(r['ci_high'], '.3f')}]" if r["ci_low"] is not None else "–"
        status = r["status"] if not r["error"] else f"{r['status']}: {r['error'][:120]}"
        lines.append(
            f"| {r['job']} | `{varying}` | {status} | {r['iterations']} | {num(r['win_rate'], '.3f')} "
            f"| {ci} | {num(r['wall_s'], '.0f')} s | {r['run_dir']} |"
        )
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """Hydra callback (conf/config.yaml: hydra.callbacks): a row per finished sweep point."""

    def __init__(self) -> None:
        self._started = time.time()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.time()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        failed = job_return.status == JobStatus.FAILED
        # The exception itself: `job_return.return_value` would re-raise it (Hydra reports it at the end).
        error = f"{type(job_return._return_value).__name__}: {job_return._return_value}" if failed else ""
        record = point_record(
            run_dir,
            int(config.hydra.job.num),
            list(job_return.overrides or []),
            "failed" if failed else "completed",
            time.time() - self._started,
            error,
        )
        write_json_atomic(run_dir / POINT_FILE, record)  # every later summary reads it
        write_summary(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        print(f"[spo_ray] sweep: {len(rows)} points; summary: {sweep_dir / 'sweep_summary.md'}", flush=True)
