"""The iterate tournament: every pair of policies judged on the same held-out prompts.

After each iteration t the run judges every pair of π_0 … π_t on the held-out prompts from
the answers already stored (`iter_<s>/answers.json`): judge calls only, no generation. Per
prompt the judge sees all the policies' answers at once, and its K×K matrix M gives every
pair in both orders (margin M[i, j] − M[j, i], as `evaluate.judge_outcomes` does for π_t
against π_0). W[i, j] is the win rate of i against j (ties ½; Wilson 95 % interval); the
Nash mixture, each policy's exploitability and the significant 3-cycles come from
spo_ray/metagame.py. Written to `iter_<t>/tournament.json` with the keys `policies`,
`win_rate`, `win_rate_ci`, `nash`, `exploitability`, `cycles`; report.md shows it.

Across runs: `python -m spo_ray.tournament RUN_DIR [RUN_DIR ...] [--judge PRESET] [--out DIR]`
pits every evaluated policy of the runs against each other; the runs must share their
held-out prompts and, unless `--judge` names one preset for all, their training judge.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from spo_ray.evaluate import outcome, win_rate
from spo_ray.metagame import exploitability, intransitive_cycles, nash_mixture
from spo_ray.run_dir import RunDir, write_json_atomic, write_text_atomic, write_then_rename

if TYPE_CHECKING:
    from spo_ray.config import Config, DataConfig, JudgeConfig
    from spo_ray.judge.base import Judge
    from spo_ray.judge.pool import JudgePool

log = logging.getLogger(__name__)

KEYS = ("policies", "win_rate", "win_rate_ci", "nash", "exploitability", "cycles")


# ---------------------------------------------------------------------------- judging
def pairwise_outcomes(
    judge: "Judge", prompts: Sequence[str], answers: Sequence[Sequence[str]], batch_size: int
) -> dict[tuple[int, int], list[Optional[float]]]:
    """For each pair i < j of policies, the per-prompt outcomes of i against j (1, ½, 0, or
    None for a non-finite margin). `answers[p][n]` is policy p's answer to prompt n; the judge
    gets `batch_size` prompts per call, each with the P answers as its K responses."""
    P, N = len(answers), len(prompts)
    if any(len(a) != N for a in answers):
        raise ValueError(f"every policy needs one answer per prompt ({N}), got {[len(a) for a in answers]}")
    pairs = [(i, j) for i in range(P) for j in range(i + 1, P)]
    out: dict[tuple[int, int], list[Optional[float]]] = {pair: [] for pair in pairs}
    for start in range(0, N, batch_size):
        batch = range(start, min(N, start + batch_size))
        logits = judge.batch_pairwise_logits([prompts[n] for n in batch], [[a[n] for a in answers] for n in batch])
        for n, m in zip(batch, logits):
            for i, j in pairs:
                out[i, j].append(outcome(answers[i][n], answers[j][n], float(m[i, j] - m[j, i])))
    return out


def tournament_record(policies: Sequence[str], outcomes: dict[tuple[int, int], list[Optional[float]]]) -> dict:
    """W, its intervals and the meta-game (spo_ray/metagame.py) from the pairs' outcomes:
    W[j, i] = 1 − W[i, j] with the mirrored interval (one set of outcomes per pair)."""
    P = len(policies)
    w = [[0.5] * P for _ in range(P)]
    ci = [[[0.5, 0.5] for _ in range(P)] for _ in range(P)]
    for (i, j), results in outcomes.items():
        r = win_rate(results)
        w[i][j], w[j][i] = r.win_rate, 1 - r.win_rate
        ci[i][j], ci[j][i] = list(r.win_rate_ci), [1 - r.win_rate_ci[1], 1 - r.win_rate_ci[0]]
    cycles = intransitive_cycles([[lo for lo, _ in row] for row in ci])
    return {
        "policies": list(policies),
        "win_rate": w,
        "win_rate_ci": ci,
        "nash": nash_mixture(w).tolist(),
        "exploitability": exploitability(w).tolist(),
        "cycles": [[policies[i], policies[j], policies[k]] for i, j, k in cycles],
    }


def judge_tournament(
    judge_cfg: "JudgeConfig",
    tokenizer_path: str,
    trust_remote_code: bool,
    held_out: list[dict],
    answers: list[list[str]],
    policies: list[str],
    timeline_dir: str | None = None,
    judge_factory: Callable | None = None,
) -> dict:
    """Build the judge (`judge_factory(judge_cfg)`, by default `build_judge`), judge every pair of `policies` (answers[p][n]: policy p on held-out
    prompt n) and return the tournament record. Plain Python; train.py runs it as a Ray task.
    The judge sees the prompts in its `prompt_format` (chat: `tokenizer_path`'s template) and,
    if reference-guided, the held-out references."""
    from spo_ray.data.chat import judge_prompts
    from spo_ray.judge import attach_references, build_judge
    from spo_ray.modeling import load_tokenizer
    from spo_ray.timeline import span

    with span(timeline_dir, "tournament"):
        judge = (judge_factory or build_judge)(judge_cfg)
        shown = judge_prompts([p["prompt"] for p in held_out], judge_cfg.prompt_format, load_tokenizer(tokenizer_path, trust_remote_code))
        attach_references(judge, shown, [p.get("reference") for p in held_out])
        print(f"[tournament] {len(policies)} policies, {len(policies) * (len(policies) - 1) // 2} pairs × {len(shown)} prompts ({judge_cfg.name} judge)", flush=True)
        return tournament_record(policies, pairwise_outcomes(judge, shown, answers, judge_cfg.batch_size))


# ---------------------------------------------------------------------------- one run, per iteration
def stored_answers(run: RunDir, t: int, prompt_ids: Sequence[str]) -> list[str]:
    """π_t's held-out answers from `iter_<t>/answers.json`, checked to be for `prompt_ids`."""
    stored = run.read_json(run.iteration(t).answers)
    if stored["prompt_ids"] != list(prompt_ids):
        raise ValueError(
            f"{run.iteration(t).answers} answers other held-out prompts than the tournament's "
            f"({len(stored['prompt_ids'])} vs {len(prompt_ids)} prompts, or another order): a tournament needs the same prompts"
        )
    return stored["answers"]


def iteration_tournament(
    cfg: "Config", run: RunDir, held_out: list[dict], t: int, judges: "JudgePool | None" = None, timeline_t: int | None = None
) -> dict:
    """π_0 … π_t of this run, every pair, under the training judge (`cfg.judge`: the run's
    `judges`, else built for it), as one Ray task with the evaluation's resources
    (`cluster.evaluate`); writes `iter_<t>/tournament.json`. Its busy time goes to iteration
    `timeline_t`'s timeline (default t)."""
    import ray

    from spo_ray.timeouts import get_within

    start = time.time()
    ids = [p["prompt_id"] for p in held_out]
    answers = [stored_answers(run, s, ids) for s in range(t + 1)]
    e = cfg.cluster.evaluate
    task = ray.remote(judge_tournament).options(num_cpus=e.num_cpus, num_gpus=e.num_gpus)
    ref = task.remote(
        cfg.judge, str(run.policy(0)), cfg.model.trust_remote_code, held_out, answers,
        [f"π_{s}" for s in range(t + 1)], str(run.timeline_parts(t if timeline_t is None else timeline_t)), judges.clients() if judges is not None else None,
    )
    record = get_within(ref, cfg.run.timeouts.eval_s, f"the tournament of {run.iter_dir(t).name}")
    run.write_json(run.iteration(t).tournament, record)
    best = max(range(t + 1), key=lambda i: record["nash"][i])
    print(
        f"[spo_ray] tournament of π_0 … π_{t}: Nash weight {record['nash'][best]:.2f} on {record['policies'][best]}, "
        f"{len(record['cycles'])} significant cycle(s); {time.time() - start:.1f}s",
        flush=True,
    )
    return record


# ---------------------------------------------------------------------------- report
def plot_tournament(record: dict, out: Path) -> None:
    """Heatmap of W (row beats column), each cell annotated with its win rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, w = record["policies"], record["win_rate"]
    size = 1.6 + 0.55 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.2, size), dpi=120)
    image = ax.imshow(w, cmap="RdBu", vmin=0, vmax=1)
    for i, row in enumerate(w):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if abs(value - 0.5) > 0.3 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("opponent j")
    ax.set_ylabel("policy i")
    ax.set_title("W[i, j]: i beats j (held-out prompts, both orders)", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    with write_then_rename(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def tournament_markdown(record: dict, plot_name: str = "tournament.png") -> list[str]:
    """The tournament as markdown: the heatmap, W with intervals, Nash weight and
    exploitability per policy, and the cycles."""
    names = record["policies"]
    lines = [
        f"![tournament]({plot_name})",
        "",
        "| policy i | " + " | ".join(f"vs {n}" for n in names) + " | Nash weight | exploitability |",
        "|---" * (len(names) + 3) + "|",
    ]
    for i, name in enumerate(names):
        cells = " | ".join(
            "—" if i == j else f"{record['win_rate'][i][j]:.3f} [{lo:.2f}, {hi:.2f}]"
            for j, (lo, hi) in enumerate(record["win_rate_ci"][i])
        )
        lines.append(f"| {name} | {cells} | {record['nash'][i]:.3f} | {record['exploitability'][i]:.3f} |")
    cycles = "; ".join(" → ".join([*c, c[0]]) for c in record["cycles"]) or "none"
    lines += ["", f"Intransitive cycles (each win's 95 % interval above ½): {cycles}."]
    return lines


def latest_tournament(run: RunDir) -> Optional[dict]:
    """The tournament.json of the run's last iteration that has one."""
    from spo_ray.run_dir import iteration_of

    found = sorted((iteration_of(p.parent), p) for p in run.path.glob("iter_*/tournament.json"))
    return json.loads(found[-1][1].read_text()) if found else None


# ---------------------------------------------------------------------------- across runs (CLI)
@dataclass(frozen=True)
class RunSettings:
    """What a tournament needs of a run's `config.yaml`: its judge, its prompt source and
    whether its tokenizer needs remote code. Read section by section, so runs made under an
    older schema (other learner or rollout keys) still compare."""

    judge: "JudgeConfig"
    data: "DataConfig"
    trust_remote_code: bool


def run_settings(run_path: Path) -> RunSettings:
    from omegaconf import OmegaConf

    from spo_ray.config import DataConfig, JudgeConfig

    path = run_path / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_path} has no config.yaml: not a run directory of spo_ray.train")
    raw = OmegaConf.load(path)
    try:
        judge, data = (OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw[key])) for schema, key in ((JudgeConfig, "judge"), (DataConfig, "data")))
    except Exception as err:
        raise ValueError(f"{path}: its judge or data section does not fit spo_ray/config.py: {err.__cause__ or err}") from None
    return RunSettings(judge, data, bool(raw.model.get("trust_remote_code", False)))  # type: ignore[arg-type]


def run_policies(run_path: Path) -> list[tuple[int, dict]]:
    """(t, answers.json) of every evaluated policy π_0, π_1, … of a run, in order."""
    out, t = [], 0
    while (path := RunDir(run_path).iteration(t).answers).is_file():
        out.append((t, json.loads(path.read_text())))
        t += 1
    if not out:
        raise FileNotFoundError(f"{run_path} has no evaluated policy (iter_0/answers.json): run spo_ray.train first")
    return out


def common_judge(configs: dict[Path, RunSettings], preset: Optional[str]) -> "JudgeConfig":
    """The judge of a tournament across runs: the preset named by `--judge`, else the runs'
    training judge, which must then be the same for all."""
    from spo_ray.compose import judge_preset

    if preset is not None:
        return judge_preset(preset)
    (first, cfg), *rest = configs.items()
    for path, other in rest:
        if other.judge != cfg.judge:
            raise ValueError(
                f"{first} and {path} were trained under different judges ({cfg.judge} vs {other.judge}); "
                "a tournament needs one: name a preset of conf/judge/ for all with --judge"
            )
    return cfg.judge


def cross_run_tournament(run_paths: Sequence[Path], preset: Optional[str] = None) -> dict:
    """Every evaluated policy of the runs against every other, on their common held-out
    prompts; a ValueError if the runs were evaluated on different prompts."""
    from spo_ray.data.prompts import load_prompts

    configs = {p: run_settings(p) for p in run_paths}
    judge_cfg = common_judge(configs, preset)
    names = [p.name for p in run_paths]
    names = names if len(set(names)) == len(names) else [str(p) for p in run_paths]
    policies, answers, ids = [], [], None
    for path, name in zip(run_paths, names):
        for t, stored in run_policies(path):
            if ids is None:
                ids, first = stored["prompt_ids"], path
            elif stored["prompt_ids"] != ids:
                raise ValueError(
                    f"{path}/iter_{t} was evaluated on other held-out prompts than {first} "
                    f"({len(stored['prompt_ids'])} vs {len(ids)}; check data.source, data.num_eval and data.split_seed): "
                    "a tournament needs the same prompts"
                )
            policies.append(f"π_{t}" if len(run_paths) == 1 else f"{name}:π_{t}")
            answers.append(stored["answers"])
    d = configs[run_paths[0]].data
    by_id = {r["prompt_id"]: r for r in load_prompts(d.source, d.format, d.prompt_field, d.id_field).rows}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(
            f"{len(missing)} held-out prompts of the runs (e.g. {missing[0]!r}) are not in data.source={d.source!r} "
            f"of {run_paths[0]}/config.yaml: the prompts (and references) are read from there"
        )
    held_out = [by_id[i] for i in ids]
    trust = configs[run_paths[0]].trust_remote_code
    return judge_tournament(judge_cfg, str(RunDir(run_paths[0]).policy(0)), trust, held_out, answers, policies)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m spo_ray.tournament", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of spo_ray.train")
    parser.add_argument("--judge", default=None, help="a preset of conf/judge/ for all runs (default: their common training judge)")
    parser.add_argument("--out", type=Path, default=Path("tournament"), help="folder for tournament.json, .png and .md")
    args = parser.parse_args(argv)
    start = time.time()
    record = cross_run_tournament([p.resolve() for p in args.runs], args.judge)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "tournament.json", record)
    plot_tournament(record, args.out / "tournament.png")
    markdown = "\n".join(["# Tournament", "", *tournament_markdown(record)]) + "\n"
    write_text_atomic(args.out / "tournament.md", markdown)
    print(markdown + f"\n[tournament] {len(record['policies'])} policies in {time.time() - start:.0f}s; written to {args.out}/", flush=True)
    return record


if __name__ == "__main__":
    main()
