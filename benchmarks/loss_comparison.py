"""SPPO against DPO, IPO and sppo_hard: one Hydra sweep's runs, summarized as the paper's table.

The sweep (issue 14; every point the same preset, prompts, seeds and budget; only the loss differs):

    python -m spo_ray.train -m experiment=smollm2_sppo learner.loss=sppo,dpo,ipo,sppo_hard \\
        evaluate.judge=reference_mpnet cluster.address=local hydra.sweep.dir=runs/loss_comparison

Then, from its directory (one run dir per point, `<sweep dir>/<n>`):

    python benchmarks/loss_comparison.py runs/loss_comparison --out benchmarks/results/loss_comparison
    python -m spo_ray.tournament runs/loss_comparison/[0-9]* --out benchmarks/results/loss_comparison/tournament

writes `summary.json` ({"methods": {"sppo": [{"iteration", "win_rate", "win_rate_ci",
"independent_win_rate", "independent_win_rate_ci", "avg_length", ...}, ...], "dpo": [...]}}),
`table.md` (the paper's layout: a row per method and iteration, π_0 first) and
`win_rate.png` (win rate against π_0 per iteration, one line per method, one panel per
judge). Each π_t's numbers are the run's own records (`metrics.jsonl`, kind "iteration"):
π_t against π_0 on the held-out prompts, under the training judge and under
`evaluate.judge`, the independent one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spo_ray.run_dir import RunDir  # noqa: E402

KEYS = ("iteration", "win_rate", "win_rate_ci", "independent_win_rate", "independent_win_rate_ci", "avg_length")
EXTRA = ("wins", "ties", "losses", "n", "independent_wins", "independent_ties", "independent_losses", "judge_agreement", "pairs", "margin")
NAMES = {"sppo": "SPPO", "dpo": "DPO", "ipo": "IPO", "sppo_hard": "SPPO-hard"}
ORDER = ("dpo", "ipo", "sppo_hard", "sppo")  # the paper's rows: baselines first, SPPO last


def point_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's run dirs (`<sweep dir>/<n>`, each with its config.yaml), in job order."""
    dirs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit() and (p / "config.yaml").exists()), key=lambda p: int(p.name))
    if not dirs:
        raise FileNotFoundError(f"{sweep_dir}: no sweep point dirs (<n>/config.yaml); is this a hydra.sweep.dir?")
    return dirs


def method_of(run_path: Path) -> tuple[str, dict[str, Any]]:
    """The point's loss and what the summary states about its setting."""
    cfg = yaml.safe_load((run_path / "config.yaml").read_text())
    learner, data = cfg["learner"], cfg["data"]
    setting = {
        "run_dir": str(run_path),
        "beta": learner["beta"],
        "lr": learner["lr"],
        "prompts_per_iteration": data["prompts_per_iteration"],
        "held_out": data["num_eval"],
        "judge": cfg["judge"]["name"],
        "independent_judge": cfg["evaluate"]["judge"],
        "seed": cfg["run"]["seed"],
    }
    return learner["loss"], setting


def iterations(run_path: Path) -> list[dict[str, Any]]:
    """The run's iteration records, reduced to the summary's keys (and a few counts)."""
    rows = []
    for record in RunDir(run_path).metrics():
        if record.get("kind") == "iteration":
            rows.append({k: record.get(k) for k in (*KEYS, *EXTRA)})
    return sorted(rows, key=lambda r: r["iteration"])


def summarize(sweep_dir: Path) -> dict[str, Any]:
    """{"methods": {loss: [iteration rows]}, "settings": {loss: setting}, "baseline_avg_length": …}."""
    methods: dict[str, list] = {}
    settings: dict[str, dict] = {}
    baseline = None
    for path in point_dirs(sweep_dir):
        loss, setting = method_of(path)
        if loss in methods:
            raise ValueError(f"{path}: a second point with learner.loss={loss} ({settings[loss]['run_dir']}); one per loss")
        methods[loss], settings[loss] = iterations(path), setting
        records = [r for r in RunDir(path).metrics() if r.get("kind") == "iteration"]
        if records:
            baseline = records[0].get("baseline_avg_length", baseline)
    shared = {k for k in ("prompts_per_iteration", "held_out", "judge", "independent_judge", "seed") if len({s[k] for s in settings.values()}) > 1}
    if shared:
        raise ValueError(f"the points differ in {sorted(shared)}: a comparison needs the same prompts, judges and seed")
    return {"methods": methods, "settings": settings, "baseline_avg_length": baseline}


def _cell(rate: float | None, ci: list[float] | None) -> str:
    return "—" if rate is None else f"{rate:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def table(summary: dict[str, Any]) -> str:
    """The paper's Table 1 layout: model (method, iteration) | win rates vs π_0 | avg length."""
    settings = next(iter(summary["settings"].values()))
    lines = [
        f"| model | win rate vs π_0, training judge ({settings['judge']}) [95 % CI] | "
        f"win rate vs π_0, independent judge ({settings['independent_judge']}) [95 % CI] | avg length (tokens) |",
        "|---|---|---|---|",
    ]
    base = summary["baseline_avg_length"]
    lines.append(f"| π_0 | 0.500 | 0.500 | {base:.1f} |" if base is not None else "| π_0 | 0.500 | 0.500 | — |")
    for loss in sorted(summary["methods"], key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m)):
        for row in summary["methods"][loss]:
            lines.append(
                f"| {NAMES.get(loss, loss)} (β = {summary['settings'][loss]['beta']:g}) iter {row['iteration']} | "
                f"{_cell(row['win_rate'], row['win_rate_ci'])} | {_cell(row['independent_win_rate'], row['independent_win_rate_ci'])} | "
                f"{row['avg_length']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = next(iter(summary["settings"].values()))
    panels = (("win_rate", f"training judge ({settings['judge']})"), ("independent_win_rate", f"independent judge ({settings['independent_judge']})"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (key, title) in zip(axes, panels):
        for n, (loss, rows) in enumerate(sorted(summary["methods"].items())):
            rows = [r for r in rows if r.get(key) is not None]
            xs = [0] + [r["iteration"] + 0.04 * (n - 1.5) for r in rows]
            ys = [0.5] + [r[key] for r in rows]
            low = [0.0] + [r[key] - r[f"{key}_ci"][0] for r in rows]
            high = [0.0] + [r[f"{key}_ci"][1] - r[key] for r in rows]
            ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=NAMES.get(loss, loss))
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(title)
        ax.set_xlabel("iteration t")
        ax.set_xticks(range(0, 1 + max((len(r) for r in summary["methods"].values()), default=0)))
    axes[0].set_ylabel("win rate of π_t vs π_0 (95 % CI)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="the sweep's hydra.sweep.dir (one run dir per point)")
    parser.add_argument("--out", type=Path, required=True, help="folder for summary.json, table.md, win_rate.png")
    args = parser.parse_args(argv)
    summary = summarize(args.sweep_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "table.md").write_text(table(summary))
    plot(summary, args.out / "win_rate.png")
    print(table(summary))
    return summary


if __name__ == "__main__":
    main()
