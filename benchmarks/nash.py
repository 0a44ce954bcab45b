"""The intransitive game: does a method's policy approach the game's Nash equilibrium?

The game (spo_ray/judge/cyclic.py): a response's class is its first character —
lowercase letter, uppercase letter, anything else — and the classes play a weighted
rock–paper–scissors, P(lower ≻ upper) = 0.6, P(upper ≻ other) = 0.9, P(other ≻ lower)
= 0.7 (conf/judge/cyclic.yaml). No class is best; the Nash equilibrium, the von Neumann
winner SPPO's theorem is about, is the mixture (4/7, 2/7, 1/7). A tiny random policy
starts near (0.29, 0.27, 0.44), exploitable by 0.15.

Two ways to play it, each writing the same JSON (`--out`):

    tabular   a policy that is a distribution over the 3 classes. sppo: the exact update
              π_{t+1}(y) ∝ π_t(y) exp(η P(y ≻ π_t)); dpo, ipo (and sppo with `--sppo
              sampled`): sampled pairs, judged and selected by spo_ray's own functions,
              trained with spo_ray.sppo's losses (benchmarks/nash_tabular.py). Seconds.
    pipeline  the real thing: `python -m spo_ray.train experiment=tiny judge=cyclic
              learner.loss=<method>` for T iterations per method (one Ray run each, under
              `--lock`), then every π_t is sampled (HFEngine, the run's sampling settings)
              and its class shares counted. Minutes per iteration on 2 CPUs.

    python benchmarks/nash.py tabular --out benchmarks/results/nash_tabular.json
    python benchmarks/nash.py pipeline --iterations 10 --runs-dir runs/nash --lock /tmp/ray.lock \
        --out benchmarks/results/nash_pipeline.json

JSON: {"nash": π*, "methods": {m: {"distribution": [π_0, ..., π_T], "exploitability_last":
[e(π_0), ..., e(π_T)], "exploitability_avg": [e(π_0), e(π̄_1), ..., e(π̄_T)]}}} with
π̄_t = mean(π_1..π_t) and e(π) = max_y P(y ≻ π) − ½; a plot beside it (same name, .png).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.nash_tabular import SampledSettings, exploitability_curves, play_mw, play_sampled  # noqa: E402
from spo_ray.judge.cyclic import CLASS_NAMES, CyclicGame, CyclicJudge, class_distribution  # noqa: E402

METHODS = ("sppo", "dpo", "ipo")
WIN_PROBS = (0.6, 0.9, 0.7)  # as conf/judge/cyclic.yaml
TINY_START = (0.29, 0.27, 0.44)  # the tiny random policy's class shares (measured, 512 samples)
# The tiny preset, with responses short enough that their first character carries the
# sequence's log-probability: 2 new tokens (+ EOS in the learner), 56 training prompts.
PIPELINE_OVERRIDES = ("experiment=tiny", "judge=cyclic", "cluster.address=local", "rollout.max_new_tokens=2",
                      "evaluate.max_new_tokens=2", "data.num_eval=8")


def method_record(game: CyclicGame, dists: list[list[float]]) -> dict:
    last, avg = exploitability_curves(game, dists)
    return {"distribution": dists, "exploitability_last": last, "exploitability_avg": avg}


def play_tabular(args: argparse.Namespace) -> dict:
    game, judge = CyclicGame(WIN_PROBS), CyclicJudge(WIN_PROBS)
    methods = {"sppo": method_record(game, play_mw(game, TINY_START, args.iterations, args.eta))}
    for loss in ("sppo", "dpo", "ipo") if args.sppo == "sampled" else ("dpo", "ipo"):
        settings = SampledSettings(loss=loss, beta=args.beta, lr=args.lr)
        methods[loss] = method_record(game, play_sampled(judge, TINY_START, args.iterations, settings, args.seed))
    return {"nash": game.nash(), "methods": methods}


def train_command(method: str, run_dir: Path, iterations: int, lock: str | None, extra: Sequence[str]) -> list[str]:
    command = [sys.executable, "-m", "spo_ray.train", *PIPELINE_OVERRIDES, f"learner.loss={method}",
               f"run.iterations={iterations}", f"run.dir={run_dir}", *extra]
    return ["flock", lock, *command] if lock else command


def run_pipeline(method: str, run_dir: Path, iterations: int, lock: str | None, extra: Sequence[str]) -> None:
    """One spo_ray.train run; a run dir that exists is resumed (finished iterations kept)."""
    # RAY_ADDRESS=local: a fresh Ray even if a stale `ray start` left its address in /tmp/ray.
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    print(f"[nash] {method}: {' '.join(train_command(method, run_dir, iterations, lock, extra))}", flush=True)
    subprocess.run(train_command(method, run_dir, iterations, lock, extra), env=env, check=True, cwd=REPO)


def sample_policies(run_dir: Path, iterations: int, samples: int, seed: int) -> list[list[float]]:
    """Class shares of π_0..π_T of a run: `samples` responses per training prompt, with
    the run's own rollout settings (temperature, top_p, max_new_tokens)."""
    import yaml

    from spo_ray.rollout.base import SamplingConfig
    from spo_ray.rollout.hf import HFEngine

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    rollout = config["rollout"]
    train_ids = set(json.loads((run_dir / "split.json").read_text())["train"])
    asset = REPO / "spo_ray" / "assets" / f"{config['data']['source']}.jsonl"  # the preset's built-in prompts
    rows = [json.loads(line) for line in asset.read_text().splitlines() if line.strip()]
    prompts = [r["prompt"] for r in rows if r["prompt_id"] in train_ids]
    sampling = SamplingConfig(num_samples=samples, temperature=rollout["temperature"], top_p=rollout["top_p"],
                              max_new_tokens=rollout["max_new_tokens"], seed=seed)
    engine = HFEngine(str(run_dir / "iter_0" / "policy"), device="cpu")
    dists = []
    for t in range(iterations + 1):
        engine.load_weights(str(run_dir / f"iter_{t}" / "policy"))
        responses = [r for rollout_ in engine.generate(prompts, sampling) for r in rollout_.responses]
        dists.append(class_distribution(responses))
        print(f"[nash] {run_dir.name} π_{t}: {[round(p, 3) for p in dists[-1]]} from {len(responses)} samples", flush=True)
    return dists


def play_pipeline(args: argparse.Namespace) -> dict:
    game = CyclicGame(WIN_PROBS)
    methods = {}
    for method in args.methods:
        run_dir = (args.runs_dir / method).resolve()
        if not args.analyze_only:
            run_pipeline(method, run_dir, args.iterations, args.lock, args.override)
        methods[method] = method_record(game, sample_policies(run_dir, args.iterations, args.samples, args.seed))
    return {"nash": game.nash(), "methods": methods}


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result["methods"]
    fig, axes = plt.subplots(2, len(methods), figsize=(4.2 * len(methods), 6.5), sharey="row", squeeze=False)
    for col, (name, rec) in enumerate(methods.items()):
        ts = range(len(rec["distribution"]))
        ax = axes[0][col]
        for c, label in enumerate(CLASS_NAMES):
            line, = ax.plot(ts, [d[c] for d in rec["distribution"]], marker="o", ms=3, label=label)
            ax.axhline(result["nash"][c], color=line.get_color(), ls=":", lw=1)
        ax.set_title(f"{name}: class shares of π_t (dotted: Nash)")
        ax.set_ylim(0, 1)
        ax = axes[1][col]
        ax.plot(ts, rec["exploitability_last"], marker="o", ms=3, label="last iterate π_t")
        ax.plot(ts, rec["exploitability_avg"], marker="s", ms=3, label="average of π_1..π_t")
        ax.axhline(0.05, color="grey", ls="--", lw=1, label="0.05")
        ax.set_xlabel("iteration t")
        ax.set_title(f"{name}: exploitability")
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary_lines(result: dict) -> list[str]:
    lines = [f"Nash {[round(p, 3) for p in result['nash']]}"]
    for name, rec in result["methods"].items():
        lines.append(f"{name:5s} π_T {[round(p, 3) for p in rec['distribution'][-1]]}  "
                     f"exploitability last {rec['exploitability_last'][-1]:.3f}  avg {rec['exploitability_avg'][-1]:.3f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("tabular", "pipeline"))
    parser.add_argument("--iterations", type=int, default=10, help="T")
    parser.add_argument("--out", type=Path, help="write the JSON here (and the plot beside it, .png)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the tabular samples and the pipeline's class counts")
    parser.add_argument("--eta", type=float, default=3.0, help="tabular sppo: η of the exact update")
    parser.add_argument("--sppo", choices=("exact", "sampled"), default="exact",
                        help="tabular sppo: the exact update, or sampled pairs like dpo/ipo (η = 1/β)")
    parser.add_argument("--beta", type=float, default=0.1, help="tabular sampled pairs: β (the tiny preset's)")
    parser.add_argument("--lr", type=float, default=0.015,
                        help="tabular sampled pairs: Adam's step on the class logits (0.015: about the pipeline's SPPO π_1..π_3)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="pipeline: losses to run")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "nash", help="pipeline: one run dir per method")
    parser.add_argument("--lock", help="pipeline: run each training run under `flock LOCK` (shared machines)")
    parser.add_argument("--samples", type=int, default=64, help="pipeline: samples per training prompt to count classes")
    parser.add_argument("--analyze-only", action="store_true", help="pipeline: only sample the runs already in --runs-dir")
    parser.add_argument("--override", nargs="*", default=[], help="pipeline: extra Hydra overrides for every run")
    args = parser.parse_args()

    result = play_tabular(args) if args.mode == "tabular" else play_pipeline(args)
    print("\n".join(summary_lines(result)))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        plot(result, args.out.with_suffix(".png"), f"cyclic game, {args.mode}: T = {args.iterations}")
        print(f"[nash] wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
