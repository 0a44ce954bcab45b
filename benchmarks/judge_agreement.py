"""Two judges on the same held-out pairs: π_t against π_0 of finished runs, from their stored
answers (no generation), under the runs' training judge and a second judge preset.

    PYTHONPATH=. python benchmarks/judge_agreement.py RUN_DIR [RUN_DIR ...] \
        [--judge reference_mpnet] [--out benchmarks/results/judge_agreement.json]

Per run and iteration: both win rates (Wilson 95 %) and the agreement, the share of prompts the
two judges gave the same outcome among those where π_t's and π_0's answers differ (identical
answers tie by rule, whatever a judge says), as `evaluate.judge` reports it during a run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import machine_line  # noqa: E402
from spo_ray.compose import judge_preset  # noqa: E402
from spo_ray.data.prompts import load_prompts  # noqa: E402
from spo_ray.evaluate import judge_agreement, judge_outcomes, win_rate  # noqa: E402
from spo_ray.judge import attach_references, build_judge  # noqa: E402
from spo_ray.tournament import common_judge, run_policies, run_settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--judge", default="reference_mpnet", help="the second judge: a preset of conf/judge/")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    settings = {p: run_settings(p) for p in args.runs}
    first = settings[args.runs[0]]
    configs = {"training": common_judge(settings, None), args.judge: judge_preset(args.judge)}
    rows_by_id = {r["prompt_id"]: r for r in load_prompts(first.data.source, first.data.format, first.data.prompt_field, first.data.id_field).rows}
    judges, rows = {}, []
    for run in args.runs:
        policies = run_policies(run)
        held_out = [rows_by_id[i] for i in policies[0][1]["prompt_ids"]]
        prompts = [p["prompt"] for p in held_out]  # both presets judge raw prompts here (prompt_format: raw)
        for name, cfg in configs.items():
            judges.setdefault(name, build_judge(cfg))
            attach_references(judges[name], prompts, [p.get("reference") for p in held_out])
        baseline = policies[0][1]["answers"]
        for t, stored in policies[1:]:
            start = time.time()
            outcomes = {name: judge_outcomes(j, prompts, stored["answers"], baseline) for name, j in judges.items()}
            differ = [a != b for a, b in zip(stored["answers"], baseline)]
            share, n = judge_agreement(*([o for o, d in zip(v, differ) if d] for v in outcomes.values()))
            rates = {name: win_rate(o).as_dict() for name, o in outcomes.items()}
            rows.append({"run": run.name, "iteration": t, "win_rate": rates, "agreement": share, "agreement_n": n, "seconds": time.time() - start})
            print(f"{run.name} π_{t} vs π_0: " + ", ".join(f"{k} {v['win_rate']:.3f}" for k, v in rates.items()) + f"; agreement {share:.3f} (n={n})", flush=True)
    pooled_n = sum(r["agreement_n"] for r in rows)
    pooled = sum(r["agreement"] * r["agreement_n"] for r in rows if r["agreement_n"]) / max(1, pooled_n)
    print(f"pooled agreement {pooled:.3f} over {pooled_n} differing pairs")
    if args.out:
        record = {"judges": {k: str(v) for k, v in configs.items()}, "rows": rows, "pooled_agreement": pooled, "pooled_n": pooled_n,
                  "machine": machine_line(), "date": time.strftime("%Y-%m-%d")}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
