"""The chaos table: what each injected fault did to a run, from the fault suite's records.

`make chaos` runs every test marked `fault` (pytest -m fault) with SPO_RAY_CHAOS_REPORT
set: each test calls `tests.fault_report.record_fault` for what it injected and saw, one
JSON line each, and pytest writes its JUnit XML beside it. This script joins the two,
prints the table and writes benchmarks/results/chaos.json.

Columns:
  fault, phase      what was injected, and when in the iteration
  recovered         yes: the iteration finished by itself (or by resuming with the same
                    run.dir, where the test says so); no: the run stopped — for the
                    timeouts that is the intended outcome: a clear error instead of a hang
  prompts lost      input prompts missing from the iteration's pairs + skipped rows
  prompts repeated  prompts appearing more than once there
  extra time        wall time of the faulted run minus that of a clean run of the same
                    size measured in the same test session (same machine, same load);
                    "–" where the test does not time a clean twin

    python benchmarks/chaos.py runs/chaos/records.jsonl --junit runs/chaos/junit.xml
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("fault", "phase", "recovered", "prompts lost", "prompts repeated", "extra time")


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_junit(path: Path | None) -> dict:
    """Test count, failures (by name) and the suite's total seconds, from pytest's JUnit XML."""
    if path is None or not path.exists():
        return {}
    cases = ET.parse(path).getroot().iter("testcase")
    tests, failed, seconds = 0, [], 0.0
    for case in cases:
        tests += 1
        seconds += float(case.get("time", 0))
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return {"tests": tests, "failed": failed, "test_seconds": round(seconds, 1)}


def table_rows(records: list[dict]) -> list[tuple[str, ...]]:
    rows = []
    for r in records:
        extra = "–" if r.get("extra_s") is None else f"{r['extra_s']:+.1f} s"
        recovered = "yes" if r["recovered"] else "no"
        if r.get("outcome") and not r["recovered"]:
            recovered += f" — {r['outcome']}"
        rows.append((r["fault"], r["phase"], recovered, str(r["prompts_lost"]), str(r["prompts_repeated"]), extra))
    return rows


def markdown(rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", type=Path, help="the JSON lines written by the fault tests (SPO_RAY_CHAOS_REPORT)")
    ap.add_argument("--junit", type=Path, help="pytest's --junitxml file of the same run")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "chaos.json")
    args = ap.parse_args()

    records = read_records(args.records)
    suite = read_junit(args.junit)
    rows = table_rows(records)
    print(markdown(rows))
    if suite:
        print(f"\n{suite['tests']} fault tests, {len(suite['failed'])} failed, {suite['test_seconds']:.0f} s of test time")
        for name in suite["failed"]:
            print(f"  FAILED {name}")
    if not records:
        print("(no records: run the suite with SPO_RAY_CHAOS_REPORT set, e.g. `make chaos`)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "suite": suite,
        "extra_time": "faulted run's wall time minus a clean run of the same size in the same test session",
        "rows": records,
    }, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
