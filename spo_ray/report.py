"""`report.md` and its plots (win rate, log-ratios, timeline), rebuilt from the run
directory after each iteration."""

from __future__ import annotations

import json
from pathlib import Path

from spo_ray.run_dir import RunDir, write_text_atomic, write_then_rename
from spo_ray.timeline import STAGES, WORK_STAGES
from spo_ray.tournament import latest_tournament, plot_tournament, tournament_markdown

_TOURNAMENT_NOTE = (
    "Every pair of policies judged on the held-out prompts in both orders by the training judge "
    "(iter_t/tournament.json of the last iteration): W[i, j] is the rate at which i beats j (ties ½) with its "
    "95 % Wilson interval. The Nash weight is the policy's share in the mixture that no policy beats "
    "(the symmetric zero-sum meta-game's maximin, a linear program); exploitability is max_j W[j, i] − ½, "
    "how far the policy's best opponent beats it."
)


def _plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in rows]
    wr = [r["win_rate"] for r in rows]
    lo = [r["win_rate"] - r["win_rate_ci"][0] for r in rows]
    hi = [r["win_rate_ci"][1] - r["win_rate"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.errorbar(its, wr, yerr=[lo, hi], marker="o", capsize=4, label="π_t vs π_0 (95 % CI)")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="no change")
    ax.set_xlabel("SPPO iteration t")
    ax.set_ylabel("judged win rate")
    ax.set_ylim(0, 1)
    ax.set_xticks(its)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, out)


def _plot_steps(steps: list[dict], out: Path) -> None:
    """a, b and the margin a − b per learner step: a and b rising together is sharpening
    (both samples get likelier), a rising while b falls is preference learning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    x = list(range(1, len(steps) + 1))
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.plot(x, [s["chosen_logratio"] for s in steps], label="a = log π_θ/π_t (chosen)")
    ax.plot(x, [s["rejected_logratio"] for s in steps], label="b = log π_θ/π_t (rejected)")
    ax.plot(x, [s["margin"] for s in steps], label="margin a − b", linewidth=2)
    for n in range(1, len(steps)):
        if steps[n]["iteration"] != steps[n - 1]["iteration"]:
            ax.axvline(n + 0.5, color="grey", linestyle=":", linewidth=1)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("learner step (dotted: next iteration)")
    ax.set_ylabel("nats")
    ax.legend(fontsize=7)
    _save(fig, out)


def _plot_timeline(timelines: list[dict], out: Path) -> None:
    """One row per stage, a bar wherever it was busy; the iterations one after another on one
    time axis (dotted: an iteration's start). Work in blue, the learner waiting for rows in
    orange, other overhead (starting, loading, saving, syncing) in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = {name: n for n, name in enumerate(STAGES)}
    names = sorted({s["name"] for tl in timelines for s in tl["stages"]}, key=lambda name: (order.get(name, len(order)), name))
    row = {name: n for n, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.32 * len(names)), dpi=120)
    offset = 0.0
    for tl in timelines:
        for stage in tl["stages"]:
            bars = [(offset + a, max(b - a, 1e-3)) for a, b in stage["intervals"]]
            color = "tab:blue" if stage["name"] in WORK_STAGES else "tab:orange" if stage["name"] == "learner_wait" else "tab:gray"
            ax.broken_barh(bars, (row[stage["name"]] - 0.35, 0.7), color=color)
        ax.axvline(offset, color="black", linestyle=":", linewidth=1)
        ax.text(offset, -0.6, f" t={tl['iteration']}: {tl['work_s']:.0f}s work / {tl['wall_s']:.0f}s", fontsize=7, va="bottom")
        offset += tl["wall_s"]
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(len(names) - 0.5, -0.9)  # first stage on top, room for the iteration labels
    ax.set_xlim(0, max(offset, 1e-3))
    ax.set_xlabel("seconds, iterations one after another (blue: work; orange: learner waits for rows; grey: other overhead)")
    _save(fig, out)


def _save(fig, out: Path) -> None:
    """Write-then-rename, like report.md: a run killed mid-write keeps the previous plot."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with write_then_rename(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def step_rows(run: RunDir) -> list[dict]:
    """The learner's per-step records of finished iterations (from metrics.jsonl), one per
    (iteration, step): a driver that dies while appending an iteration's step records, before
    its iteration record, appends them again on resume; the last copy counts."""
    steps = {}
    for m in run.metrics():
        if m.get("kind") == "step" and "margin" in m:
            steps[m["iteration"], m["step"]] = m
    return [steps[k] for k in sorted(steps)]


def iteration_rows(run: RunDir) -> list[dict]:
    """One summary row per finished iteration (from metrics.jsonl; the last record of an
    iteration counts, as for its steps)."""
    rows = {}
    for m in run.metrics():
        if m.get("kind") == "iteration":
            rows[m["iteration"]] = m
    return [rows[t] for t in sorted(rows)]


def timeline_rows(run: RunDir) -> list[dict]:
    """The timeline record of each finished iteration (from metrics.jsonl; the last counts)."""
    rows = {}
    for m in run.metrics():
        if m.get("kind") == "timeline":
            rows[m["iteration"]] = m
    return [rows[t] for t in sorted(rows)]


def timeline_section(timelines: list[dict]) -> list[str]:
    """The report's timeline: the chart and each stage's busy seconds per iteration."""
    order = {name: n for n, name in enumerate(STAGES)}
    names = sorted({s["name"] for tl in timelines for s in tl["stages"]}, key=lambda name: (order.get(name, len(order)), name))
    busy = [{s["name"]: s["busy_s"] for s in tl["stages"]} for tl in timelines]
    lines = [
        "",
        "## Where the time went",
        "",
        "Busy intervals per stage, as recorded where the work happens (iter_t/timeline.json). Work is the union "
        f"of the {', '.join(sorted(WORK_STAGES))} intervals (overlapping work counts once); overhead = wall − work.",
        "",
        "![timeline](timeline.png)",
        "",
        "| stage (busy s) | " + " | ".join(f"t={tl['iteration']}" for tl in timelines) + " |",
        "|---" * (len(timelines) + 1) + "|",
    ]
    for name in names:
        cells = " | ".join(f"{b[name]:.1f}" if name in b else "" for b in busy)
        lines.append(f"| {'**' + name + '**' if name in WORK_STAGES else name} | {cells} |")
    lines.append("| wall / work / overhead | " + " | ".join(f"{tl['wall_s']:.0f} / {tl['work_s']:.0f} / {tl['wall_s'] - tl['work_s']:.0f}" for tl in timelines) + " |")
    return lines


def _overhead(r: dict) -> str:
    """`overhead of wall` seconds; records from before the timeline have neither."""
    if "wall_s" not in r:
        return "?"
    return f"{r['wall_s'] - r['work_s']:.0f} of {r['wall_s']:.0f}"


def write_report(run: RunDir, config_summary: dict[str, str], examples: list[dict]) -> Path:
    rows = iteration_rows(run)
    run.write_json("iterations.json", rows)  # the table's records, for other tools and benchmarks/results
    lines = ["# spo_ray run report", "", f"Run directory: `{run.path}`", "", "## Configuration", ""]
    lines += [f"- **{k}**: {v}" for k, v in config_summary.items()]
    lines += [
        "",
        "## Iterations",
        "",
        "a and b are the mean log-ratios log π_θ/π_t of the chosen and rejected responses over the "
        "iteration's steps: a rising with b falling is preference learning; both rising is sharpening.",
        "",
        "The win rate of π_t against π_0 is (wins + ties/2) / n over the n held-out prompts the judge "
        "gave a finite margin, with a 95 % Wilson interval; prompts with a NaN/inf margin are counted "
        "under judge NaN and left out.",
        "",
        "| t | pairs | skipped | loss | a (chosen) | b (rejected) | margin a−b | win rate vs π_0 [95 % CI] | wins / ties / losses | judge NaN | avg length (tokens) | stream+train s | eval s | overhead s (of wall) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(r["skipped"].items())) or "0"
        lines.append(
            f"| {r['iteration']} | {r['pairs']} | {skipped} | {r['loss']:.4g} | {r['chosen_logratio']:+.3f} | "
            f"{r['rejected_logratio']:+.3f} | {r['margin']:+.3f} | {r['win_rate']:.3f} "
            f"[{r['win_rate_ci'][0]:.3f}, {r['win_rate_ci'][1]:.3f}] | {_outcome_counts(r)} | {r.get('judge_nan', '?')} | "
            f"{r['avg_length']:.1f} (π_0: {r['baseline_avg_length']:.1f}) | {r['train_s']:.0f} | {r['eval_s']:.0f} | {_overhead(r)} |"
        )
    if rows:
        _plot(rows, run.path / "win_rate.png")
        lines += ["", "![win rate per iteration](win_rate.png)"]
        lines += independent_judge(rows)
        lines += data_handling(rows)
    tournament = latest_tournament(run)
    if tournament is not None:
        plot_tournament(tournament, run.path / "tournament.png")
        lines += ["", "## Tournament of the iterates", "", _TOURNAMENT_NOTE, "", *tournament_markdown(tournament)]
    timelines = timeline_rows(run)
    if timelines:
        _plot_timeline(timelines, run.path / "timeline.png")
        lines += timeline_section(timelines)
    steps = step_rows(run)
    if steps:
        _plot_steps(steps, run.path / "logratios.png")
        lines += [
            "",
            "## Per learner step: chosen and rejected log-ratios",
            "",
            "![a, b and a − b per step](logratios.png)",
            "",
            "<details><summary>per-step table</summary>",
            "",
            "| iteration | step | pairs | loss | a (chosen) | b (rejected) | margin a−b | lr after the step |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {s['iteration']} | {s['step']} | {s['pairs']} | {s['loss']:.4g} | {s['chosen_logratio']:+.3f} | "
            f"{s['rejected_logratio']:+.3f} | {s['margin']:+.3f} | {s['lr']:.2e} |"
            for s in steps
        ]
        lines += ["", "</details>"]
    if examples:
        lines += ["", "## Examples (held-out prompts; first those whose greedy answer changed)", ""]
        for ex in examples:
            lines += [
                f"**Prompt:** {ex['prompt']}",
                "",
                "| π_0 | π_" + str(ex["iteration"]) + " |",
                "|---|---|",
                f"| {_cell(ex['baseline'])} | {_cell(ex['answer'])} |",
                "",
            ]
    # A run killed mid-write keeps the previous report whole.
    return write_text_atomic(run.path / "report.md", "\n".join(lines) + "\n")


def independent_judge(rows: list[dict]) -> list[str]:
    """The report's second-judge section (evaluate.judge): per iteration, the independent judge's
    win rate of π_t against π_0 beside the training judge's, and how often the two agree."""
    rows = [r for r in rows if "independent_win_rate" in r]
    if not rows:
        return []
    lines = [
        "",
        f"## Independent judge ({rows[-1]['independent_judge']})",
        "",
        "The same held-out pairs judged again by a judge the policy was not trained on (evaluate.judge); "
        "agreement is the share of prompts both judges gave the same outcome (win, tie or loss), over the n "
        "prompts where π_t's and π_0's answers differ (identical answers tie by rule).",
        "",
        "| t | training judge [95 % CI] | independent judge [95 % CI] | wins / ties / losses | judge NaN | agreement (n) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        agree = "?" if r["judge_agreement"] is None else f"{r['judge_agreement']:.3f}"
        (lo, hi), (ilo, ihi) = r["win_rate_ci"], r["independent_win_rate_ci"]
        lines.append(
            f"| {r['iteration']} | {r['win_rate']:.3f} [{lo:.3f}, {hi:.3f}] | {r['independent_win_rate']:.3f} [{ilo:.3f}, {ihi:.3f}] | "
            f"{r['independent_wins']} / {r['independent_ties']} / {r['independent_losses']} | {r['independent_judge_nan']} | "
            f"{agree} ({r['judge_agreement_n']}) |"
        )
    return lines


def _outcome_counts(r: dict) -> str:
    """`wins / ties / losses`; records written before wins and losses were counted (a run
    directory resumed across the change) have ties and n only."""
    if "wins" not in r:
        return f"? / {r['ties']} / ? (n={r['n']})"
    return f"{r['wins']} / {r['ties']} / {r['losses']}"


# What happens to a prompt or pair that cannot be used as it is (README: "Bad data").
DATA_RULES = {
    "judge_nan": "the judge gave a NaN/inf score: prompt skipped",
    "all_tied": "all K responses scored equal: prompt skipped (no preference)",
    "too_few_responses": "fewer than 2 responses: prompt skipped",
    "tokenize_error": "the policy's tokenizer failed on the pair: pair skipped (weight 0; kept in pairs/ for audit)",
}


def data_handling(rows: list[dict]) -> list[str]:
    """The report's bad-data section: per iteration, what was skipped (by reason) and truncated."""
    reasons = sorted({k for r in rows for k in r["skipped"]} | {"judge_nan", "tokenize_error"})
    lines = [
        "",
        "## Data handling",
        "",
        "Nothing is dropped silently: prompts without a usable pair are counted by reason; prompts longer than "
        "learner.max_prompt_length keep their last tokens, responses longer than what is left of learner.max_length "
        "keep their first tokens.",
        "",
        "| t | pairs trained | " + " | ".join(f"skipped: {k}" for k in reasons) + " | prompts truncated | responses truncated |",
        "|---" * (len(reasons) + 4) + "|",
    ]
    for r in rows:
        skipped = " | ".join(str(r["skipped"].get(k, 0)) for k in reasons)
        lines.append(f"| {r['iteration']} | {r['pairs']} | {skipped} | {r['prompts_truncated']} | {r['responses_truncated']} |")
    lines += ["", *(f"- `{k}`: {DATA_RULES.get(k, 'skipped')}" for k in reasons)]
    return lines


def _cell(text: str) -> str:
    return json.dumps(text)[1:-1].replace("|", "\\|") or "(empty)"
