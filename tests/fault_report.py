"""The chaos table's recorder: each fault test records what it saw (`make chaos`).

One JSON line per call is appended to the file named by SPO_RAY_CHAOS_REPORT; without
that variable (a plain `pytest` run) recording does nothing. benchmarks/chaos.py turns
the lines into the table.
"""

from __future__ import annotations

import json
import os

REPORT_ENV = "SPO_RAY_CHAOS_REPORT"


def record_fault(
    fault: str,
    phase: str,
    recovered: bool,
    prompts_lost: int,
    prompts_repeated: int,
    extra_s: float | None,
    **detail,
) -> None:
    """Append one row of the chaos table.

    fault: what was injected (e.g. "rollout actor exits (rollout_batch@2)"); phase: when
    (e.g. "generation"); recovered: whether the run finished by itself or by a resume;
    prompts_lost / prompts_repeated: prompts missing from, or duplicated in, the
    iteration's pairs + skipped rows compared with its input; extra_s: wall time of the
    faulted run minus a clean run of the same size in the same session (None: not
    measured); detail: anything else worth keeping (e.g. faulted_s, clean_s).
    """
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    row = dict(
        fault=fault,
        phase=phase,
        recovered=bool(recovered),
        prompts_lost=int(prompts_lost),
        prompts_repeated=int(prompts_repeated),
        extra_s=None if extra_s is None else round(float(extra_s), 1),
        **detail,
    )
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
