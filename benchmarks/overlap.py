"""Streamed vs sequential: the same SPPO iteration run both ways, timed.

    sequential  generate all → judge all → train  (the paper's scripts: three jobs)
    streamed    prompts → rollout pool → judge pool → TorchTrainer, all at once

Both modes run the real Ray Data stages and the real Ray Train + DeepSpeed learner of
spo_ray. `--simulate` keeps that machinery but replaces the work inside each stage by a
fixed cost per batch (sleep), so the overlap a cluster with disjoint GPUs per stage
would get can be measured on 2 CPUs. The default costs are in the proportions
generation : ranking : training = 1.0 : 0.5 : 0.8 — our estimate for one batch of the
paper's setting on A100s (vLLM sampling K=5 responses of up to 1k tokens; PairRM's
K(K−1) DeBERTa-large passes; a ZeRO-3 forward/backward of a 7B policy and its reference
on two responses). No public measurement gives these ratios; pass your own with
`--gen-s/--judge-s/--train-s`.

    python benchmarks/overlap.py --out benchmarks/results/overlap_cpu.json
    python benchmarks/overlap.py --simulate --out benchmarks/results/overlap_simulated.json

Each mode is timed as a run's later iteration sees it (default, `--learner persistent`):
one persistent learner (spo_ray/learner/persistent.py) trains three iterations on the
run's persistent rollout engines and judges (spo_ray/rollout/engines.py,
spo_ray/judge/pool.py; with `--simulate` they hold the cost model), a warm-up that pays
the workers', DeepSpeed's, the models' and the engines' start untimed, then sequential,
then streamed. `--learner per-iteration` times each mode with its own TorchTrainer and
its own stage actors, start-up included (how every iteration ran before the persistent
learner and engines).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from functools import partial
from pathlib import Path

import ray
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spo_ray.rollout.base import Rollout  # noqa: E402


class SimulatedEngine:
    """Sleeps `batch_s` per rollout batch and returns K distinct dummy responses."""

    def __init__(self, cfg, policy_path: str, batch_s: float) -> None:
        self.batch_s = batch_s

    def generate(self, prompts, sampling):
        time.sleep(self.batch_s)
        k = sampling.num_samples
        return [Rollout([f"response {i} " * (i + 1) for i in range(k)], [i + 1 for i in range(k)], [False] * k) for _ in prompts]

    def load_weights(self, path: str) -> None:
        pass

    def shutdown(self) -> None:
        pass


class SimulatedStep:
    """A learner step that sleeps `step_s` instead of computing (the models are still built
    and the loop around the step runs as usual)."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s

    def __call__(self, models, group, cfg, stats=None):
        from spo_ray.learner.step import StepSums

        time.sleep(self.step_s)
        return StepSums(rows=sum(len(micro) for micro in group))


class SimulatedJudge:
    """Sleeps `batch_s` per judge batch; prefers longer responses."""

    def __init__(self, cfg, device: str, batch_s: float) -> None:
        self.batch_s = batch_s

    def pairwise_logits(self, prompt, responses):
        f = torch.tensor([float(len(r)) for r in responses])
        return f[:, None] - f[None, :]

    def batch_pairwise_logits(self, prompts, responses):
        time.sleep(self.batch_s)
        return [self.pairwise_logits(p, r) for p, r in zip(prompts, responses)]


def pair_stream(cfg, policy: str, prompts: list[dict], mode: str, args, timeline_dir: str | None = None, engines=None, judges=None):
    """The iteration's pairs: streamed (lazy), or sequential (generated, then judged, all of
    it, before the learner gets a row). On the run's persistent `engines` and `judges`
    (`run_warm`), or on stage actors that build their own (`run_once`). The stages record
    their start and busy time into `timeline_dir` (spo_ray/timeline.py)."""
    from spo_ray.pipeline import judge_stream, rollout_stream

    engine_factory, judge_factory = factories(args)
    rollouts = rollout_stream(cfg, prompts, policy, 1, engine_factory, engines=engines, timeline_dir=timeline_dir)
    if mode == "sequential":
        rollouts = rollouts.materialize()  # generate all ...
        return judge_stream(cfg, rollouts, policy, 1, judge_factory, timeline_dir=timeline_dir, judges=judges).materialize()  # ... then judge all
    return judge_stream(cfg, rollouts, policy, 1, judge_factory, timeline_dir=timeline_dir, judges=judges)


def factories(args) -> tuple:
    """The engine and judge factories: the cost model's (`--simulate`), else the real ones."""
    from spo_ray.judge import build_judge
    from spo_ray.rollout.factory import make_engine

    if args.simulate:
        return partial(SimulatedEngine, batch_s=args.gen_s), partial(SimulatedJudge, batch_s=args.judge_s)
    return make_engine, build_judge


def step_extra(args) -> dict:
    return {"step": SimulatedStep(args.train_s)} if args.simulate else {}


def check_rows(run, t: int, prompts: list[dict]) -> None:
    summary = run.read_json(run.iteration(t).learner_summary)
    assert summary["rows"] == len(prompts), summary


def run_once(cfg, policy: str, prompts: list[dict], mode: str, args) -> float:
    """One mode with its own TorchTrainer (`--learner per-iteration`), start-up included."""
    from spo_ray.run_dir import RunDir
    from spo_ray.train import make_trainer

    run = RunDir(tempfile.mkdtemp(prefix=f"overlap-{mode}-"))
    start = time.time()
    pairs = pair_stream(cfg, policy, prompts, mode, args)
    result = make_trainer(cfg, run, pairs, policy, 1, len(prompts), **step_extra(args)).fit()  # ... then train
    if result.error:
        raise result.error
    elapsed = time.time() - start
    check_rows(run, 1, prompts)
    return elapsed


def run_warm(cfg, policy: str, prompts: list[dict], args) -> tuple[dict[str, float], dict[str, dict]]:
    """Both modes as iterations 2 and 3 of one persistent learner, after an untimed warm-up
    iteration: seconds from the iteration's stream to its last step, per mode, and each
    mode's timeline (spo_ray/timeline.py: when each stage started and was busy)."""
    from spo_ray.run_dir import RunDir
    from spo_ray.timeline import build_timeline, read_intervals
    from spo_ray.train import loop_config, start_learner

    from spo_ray.judge.pool import JudgePool
    from spo_ray.rollout.engines import RolloutEngines

    run = RunDir(tempfile.mkdtemp(prefix="overlap-warm-"))
    engine_factory, judge_factory = factories(args)
    engines, judges = RolloutEngines(cfg, policy, engine_factory), JudgePool(cfg, judge_factory)
    learner = start_learner(cfg, run)
    seconds: dict[str, float] = {}
    timelines: dict[str, dict] = {}
    try:
        engines.wait_started(1, cfg)
        judges.wait_started(1, cfg)
        for t, mode in enumerate(("warm-up", "sequential", "streamed"), start=1):
            run.prepare_train(t)
            parts = str(run.timeline_parts(t))
            start = time.time()
            stream_mode = "sequential" if mode == "sequential" else "streamed"
            pairs = partial(pair_stream, cfg, policy, prompts, stream_mode, args, parts, engines, judges)
            error = learner.train(loop_config(cfg, run, policy, t, len(prompts), **step_extra(args)), pairs)
            if error is not None:
                raise error
            end = time.time()
            seconds[mode] = end - start
            check_rows(run, t, prompts)
            timelines[mode] = build_timeline(read_intervals(parts), start, end)
            starts = ", ".join(f"{s['name']} {s['start_s']:.1f}–{s['end_s']:.1f}" for s in timelines[mode]["stages"])
            print(f"[overlap] {mode}: {seconds[mode]:.1f}s ({starts})", flush=True)
    finally:
        learner.close()
        engines.shutdown()
        judges.shutdown()
    return seconds, timelines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--simulate", action="store_true", help="replace each stage's work by a per-batch cost")
    parser.add_argument("--prompts", type=int, default=64, help="prompts in the iteration")
    parser.add_argument("--batch", type=int, default=4, help="prompts per rollout/judge batch and pairs per step")
    parser.add_argument("--gen-s", type=float, default=1.0, help="--simulate: seconds per rollout batch")
    parser.add_argument("--judge-s", type=float, default=0.5, help="--simulate: seconds per judge batch")
    parser.add_argument("--train-s", type=float, default=0.8, help="--simulate: seconds per learner step")
    parser.add_argument("--learner", choices=("persistent", "per-iteration"), default="persistent",
                        help="persistent: both modes as warm iterations of one learner; per-iteration: a TorchTrainer each, start-up timed")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()

    from tests.conftest import compose
    from spo_ray.data.prompts import load_prompts
    from spo_ray.modeling import build_random_policy, save_policy
    from spo_ray.train import start_local_ray

    b = args.batch
    _, cfg = compose([
        "experiment=tiny",
        f"rollout.batch_size={b}", f"judge.batch_size={b}", f"learner.micro_batch_size={b}",
        f"learner.global_batch_size={b}", "learner.epochs=1",
        *(["learner.checkpoint_every=0"] if args.simulate else []),  # the cost model: step work only
    ])
    rows = load_prompts("tiny_prompts", "builtin", "prompt", "prompt_id").rows
    prompts = [{**rows[i % len(rows)], "prompt_id": f"p{i}"} for i in range(args.prompts)]
    model, tok = build_random_policy(cfg.model.random_init, seed=0)
    policy = str(save_policy(model, tok, Path(tempfile.mkdtemp()) / "pi0"))

    start_local_ray(cfg.cluster.num_cpus, include_dashboard=False, log_to_driver=False)  # as a run starts it
    ray.data.DataContext.get_current().enable_progress_bars = False
    timelines: dict[str, dict] = {}
    if args.learner == "persistent":
        warm, timelines = run_warm(cfg, policy, prompts, args)
        sequential, streamed = warm["sequential"], warm["streamed"]
    else:
        sequential = run_once(cfg, policy, prompts, "sequential", args)
        streamed = run_once(cfg, policy, prompts, "streamed", args)
    ray.shutdown()

    figures = {
        "mode": "simulate" if args.simulate else "real",
        "learner": args.learner,
        "prompts": args.prompts,
        "batch": b,
        "sequential_s": round(sequential, 2),
        "streamed_s": round(streamed, 2),
        "speedup": round(sequential / streamed, 3),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.platform()}",
        "date": date.today().isoformat(),
    }
    if args.simulate:
        costs = {"generation": args.gen_s, "ranking": args.judge_s, "training": args.train_s}
        ideal = sum(costs.values()) / max(costs.values())
        figures.update(
            per_batch_cost_s=costs,
            ideal_speedup=round(ideal, 3),
            efficiency=round(figures["speedup"] / ideal, 3),
        )
    if timelines:  # where each mode's seconds went, stage by stage (without the busy intervals)
        figures["timelines"] = {mode: {**tl, "stages": [{k: v for k, v in s.items() if k != "intervals"} for s in tl["stages"]]}
                                for mode, tl in timelines.items() if mode != "warm-up"}
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
