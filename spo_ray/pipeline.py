"""One SPPO iteration as a Ray Data stream: prompts → rollout → judge → pair rows.

    prompts ─► RolloutStage (K samples per prompt from π_t, on the run's persistent
                             rollout engines, spo_ray/rollout/engines.py)
            ─► JudgeStage   (K×K pairwise logits from the run's persistent judges,
                             spo_ray/judge/pool.py → scores, then select_pairs:
                             p̂, chosen, rejected, P[w,l]; or a skip reason)
            ─► the learner's `get_dataset_shard("pairs")`, which trains while later
               prompts are still being generated and judged, and persists the rows.

Stages are thin wrappers around the plain components (`HFEngine`, the judges,
`spo_ray.sppo.select_pair`); pool sizes and resources come from `conf/cluster/`.

On the run's persistent engines and judges a stage only forwards batches, so it runs as
Ray tasks (`run_stage`) on the job's worker processes, which Ray keeps and reuses from one
stream to the next: a stream's first batch leaves at once. A stage that builds its own
engine or judge (without persistent ones: colocated placement, tests, benchmarks) is an
actor pool, whose actors start, and load it, with each stream.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from typing import TYPE_CHECKING, Callable, Sequence

import pyarrow as pa
import ray

from spo_ray.config import Config, JudgeConfig
from spo_ray.data.chat import judge_prompts
from spo_ray.data.schema import ROLLOUT_SCHEMA, STREAM_SCHEMA, filler_row, select_pairs
from spo_ray.faults import maybe_fail
from spo_ray.judge import attach_references, build_judge, scores_from_logits
from spo_ray.placement import PoolConfig
from spo_ray.rollout.base import SamplingConfig
from spo_ray.rollout.factory import make_engine
from spo_ray.timeline import record_interval, span
from spo_ray.timeouts import apply_stream_timeouts

if TYPE_CHECKING:
    from spo_ray.judge.pool import JudgePool
    from spo_ray.rollout.engines import RolloutEngines

# A pool actor that dies (node lost, OOM, crash) is restarted and the batch it was working
# on is retried on it, so a lost actor loses no prompt and repeats none (each batch's
# output is only taken once). These are Ray Data 2.60's own defaults for actor pools
# (ActorPoolMapOperator._apply_default_remote_args), stated here so that a Ray upgrade
# cannot silently drop them. Unlimited: a batch that kills every actor it reaches stops
# the run through run.timeouts.stream_no_progress_s instead.
STAGE_FAULT_TOLERANCE = dict(max_restarts=-1, max_task_retries=-1)
# The same for a stage run as tasks (the forwarders to the run's persistent engines and
# judges): a task whose worker dies is run again on another, with Ray Data 2.60's default
# (remote_fn.cached_remote_fn), stated here for the same reason.
TASK_FAULT_TOLERANCE = dict(max_retries=-1)


def batch_seed(seed: int, iteration: int, prompt_ids: Sequence[str]) -> int:
    """A sampling seed that depends only on the run seed, the iteration and the batch's
    prompts, so any actor (or a restarted one) draws the same samples."""
    digest = hashlib.sha256(f"{seed}/{iteration}/{'|'.join(prompt_ids)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class RolloutStage:
    """Rollout stage: K responses per prompt from π_t, on the engine `engine_factory` builds
    (the run's engines' clients, an engine of its own, or the simulated cost model of
    benchmarks/overlap.py). With `timeline_dir` it records its start and each batch's
    generation (spo_ray/timeline.py)."""

    def __init__(
        self, cfg: Config, policy_path: str, iteration: int, engine_factory: Callable = make_engine, timeline_dir: str | None = None
    ) -> None:
        started = time.time()
        self.timeline_dir = timeline_dir
        self.engine = engine_factory(cfg, policy_path)
        r = cfg.rollout
        self.sampling = dict(
            num_samples=r.num_samples, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens
        )
        self.seed = cfg.run.seed
        self.iteration = iteration
        record_interval(timeline_dir, "rollout_start", started, time.time())

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("prompt_id").to_pylist()
        prompts = batch.column("prompt").to_pylist()
        seed = batch_seed(self.seed, self.iteration, ids)
        with span(self.timeline_dir, "generation"):
            rollouts = self.engine.generate(prompts, SamplingConfig(seed=seed, **self.sampling))
        maybe_fail("rollout_batch")  # fault injection (spo_ray/faults.py); a no-op unless asked for
        return pa.Table.from_pydict(
            {
                "prompt_id": ids,
                "prompt": prompts,
                "responses": [r.responses for r in rollouts],
                "response_tokens": [r.num_tokens for r in rollouts],
                "reference": _column(batch, "reference"),
            },
            schema=ROLLOUT_SCHEMA,
        )


def _column(batch: pa.Table, name: str) -> list:
    """A column's values, or nulls when the batch has no such column."""
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows


class JudgeStage:
    """Judge stage: the judge's K×K logits for each prompt, reduced to scores s_i.

    With `judge.prompt_format: chat` the judge sees the prompt as the policy saw it (the
    chat template up to the assistant turn), as the paper's ranking script does. With
    `timeline_dir` it records its start and each batch's judging (spo_ray/timeline.py).
    `judge_factory`: `build_judge`, or the run's judge pool (`JudgePool.clients()`).
    """

    def __init__(
        self,
        cfg: JudgeConfig,
        policy_path: str | None,
        iteration: int,
        device: str = "cpu",
        judge_factory: Callable = build_judge,
        timeline_dir: str | None = None,
    ) -> None:
        started = time.time()
        self.timeline_dir = timeline_dir
        self.judge = judge_factory(cfg, device=device)
        self.iteration = iteration
        self.prompt_format = cfg.prompt_format
        self.tokenizer = None
        if cfg.prompt_format == "chat" and policy_path is not None:
            from spo_ray.modeling import load_tokenizer

            self.tokenizer = load_tokenizer(policy_path)
        record_interval(timeline_dir, "judge_start", started, time.time())

    def __call__(self, batch: pa.Table) -> pa.Table:
        with span(self.timeline_dir, "judging"):
            prompts = judge_prompts(batch.column("prompt").to_pylist(), self.prompt_format, self.tokenizer)
            attach_references(self.judge, prompts, _column(batch, "reference"))  # reference-guided judges only
            logits = self.judge.batch_pairwise_logits(prompts, batch.column("responses").to_pylist())
            scores = [scores_from_logits(m.double()).tolist() for m in logits]
            maybe_fail("judge_batch")
            judged = batch.append_column(pa.field("scores", pa.list_(pa.float64())), pa.array(scores, pa.list_(pa.float64())))
            # Pair selection is stateless and cheap: it runs here rather than as its own Ray
            # task, which would cost a worker start and an object-store hop per batch.
            return select_pairs(judged, self.iteration)


def rollout_stream(
    cfg: Config,
    prompts: list[dict],
    policy_path: str,
    iteration: int,
    engine_factory: Callable = make_engine,
    engines: "RolloutEngines | None" = None,
    timeline_dir: str | None = None,
) -> ray.data.Dataset:
    """Prompt rows → rollout rows, through the rollout stage (lazy). With the run's
    persistent `engines` the stage is tasks that forward batches to them and reserve
    nothing; without, an actor pool whose actors each build an engine with `engine_factory`.
    `timeline_dir`: where the stage records its busy time (spo_ray/timeline.py)."""
    rows = [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "reference": p.get("reference")} for p in prompts]
    # One block per rollout batch, so the first batches flow on while later ones are generated.
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / cfg.rollout.batch_size)))
    if engines is not None:
        engine_factory = engines.clients()
    kwargs = dict(cfg=cfg, policy_path=policy_path, iteration=iteration, engine_factory=engine_factory, timeline_dir=timeline_dir)
    return _map_stage(ds, RolloutStage, kwargs, cfg.rollout.batch_size, cfg.cluster.rollout, forwarder=engines is not None)


def judge_stream(
    cfg: Config,
    rollouts: ray.data.Dataset,
    policy_path: str,
    iteration: int,
    judge_factory: Callable = build_judge,
    timeline_dir: str | None = None,
    judges: "JudgePool | None" = None,
) -> ray.data.Dataset:
    """Rollout rows → pair rows (with skip reasons), through the judge stage (lazy). With
    the run's persistent `judges` the stage is tasks that forward batches to them and
    reserve nothing; without, an actor pool whose actors each build a judge with
    `judge_factory`."""
    c = cfg.cluster.judge
    if judges is not None:
        judge_factory = judges.clients()
    kwargs = dict(
        cfg=cfg.judge,
        policy_path=policy_path,
        iteration=iteration,
        device="cuda" if c.num_gpus > 0 else "cpu",
        judge_factory=judge_factory,
        timeline_dir=timeline_dir,
    )
    return _map_stage(rollouts, JudgeStage, kwargs, cfg.judge.batch_size, c, forwarder=judges is not None)


def _map_stage(ds: ray.data.Dataset, stage: type, kwargs: dict, batch_size: int, pool: PoolConfig, forwarder: bool) -> ray.data.Dataset:
    """`ds` through `stage`: as forwarding tasks on reused worker processes (`forwarder`:
    its work is done by the run's persistent actors), two per actor so that each actor has
    its next batch queued when it finishes one; else as an actor pool of `pool.num_actors`
    actors holding `pool`'s CPUs and GPUs."""
    if forwarder:
        return ds.map_batches(
            _TASKS[stage],
            fn_kwargs=dict(stream=uuid.uuid4().hex, kwargs=kwargs),
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.TaskPoolStrategy(size=2 * pool.num_actors),
            num_cpus=0,
            num_gpus=0,
            # Ray Data fuses consecutive task stages into one task (generate, then judge, in
            # turn), which would end their overlap; a stage with a remote-args function is
            # never fused.
            ray_remote_args_fn=_no_extra_remote_args,
            **TASK_FAULT_TOLERANCE,
        )
    return ds.map_batches(
        stage,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool.num_actors),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
        **STAGE_FAULT_TOLERANCE,
    )


def _no_extra_remote_args() -> dict:
    return {}


# This worker process's stage objects, one per stage class, each with the id of the stream
# that built it: a forwarding task's stage is built by the first batch of its stream that
# the process runs (a client, a tokenizer) and kept for the stream's next batches.
_STAGES: dict[str, tuple[str, Callable[[pa.Table], pa.Table]]] = {}


def run_stage(batch: pa.Table, stage: type, stream: str, kwargs: dict) -> pa.Table:
    """One batch through `stage(**kwargs)`, as a Ray Data task (see `_map_stage`)."""
    held = _STAGES.get(stage.__name__)
    if held is None or held[0] != stream:
        held = _STAGES[stage.__name__] = (stream, stage(**kwargs))
    return held[1](batch)


def rollout_task(batch: pa.Table, stream: str, kwargs: dict) -> pa.Table:
    """A rollout batch as a task (its name is what Ray Data's plan and progress bars show)."""
    return run_stage(batch, RolloutStage, stream, kwargs)


def judge_task(batch: pa.Table, stream: str, kwargs: dict) -> pa.Table:
    """A judge batch as a task."""
    return run_stage(batch, JudgeStage, stream, kwargs)


_TASKS = {RolloutStage: rollout_task, JudgeStage: judge_task}


def build_pair_stream(
    cfg: Config,
    prompts: list[dict],
    policy_path: str,
    iteration: int,
    engines: "RolloutEngines | None" = None,
    timeline_dir: str | None = None,
    judges: "JudgePool | None" = None,
) -> ray.data.Dataset:
    """The lazy Ray Data stream of one iteration's pair rows (nothing runs until consumed)."""
    rollouts = rollout_stream(cfg, prompts, policy_path, iteration, engines=engines, timeline_dir=timeline_dir)
    return apply_stream_timeouts(judge_stream(cfg, rollouts, policy_path, iteration, timeline_dir=timeline_dir, judges=judges), cfg)


def remaining_pair_stream(
    cfg: Config,
    prompts: list[dict],
    policy_path: str,
    iteration: int,
    iter_dir: str,
    engines: "RolloutEngines | None" = None,
    judges: "JudgePool | None" = None,
) -> ray.data.Dataset:
    """The stream of the prompts whose row is not persisted in `iter_dir` yet. Ray Train
    calls it each time it (re)starts the learner, so a restart generates nothing twice."""
    from spo_ray.run_dir import persisted_prompt_ids, timeline_parts

    done = persisted_prompt_ids(iter_dir)
    todo = [p for p in prompts if p["prompt_id"] not in done]
    if todo:
        stream = build_pair_stream(cfg, todo, policy_path, iteration, engines, str(timeline_parts(iter_dir)), judges)
    else:
        stream = ray.data.from_arrow(STREAM_SCHEMA.empty_table())
    return pad_for_workers(stream, len(todo), cfg.cluster.learner.num_workers)


def pad_for_workers(stream: ray.data.Dataset, rows: int, workers: int) -> ray.data.Dataset:
    """Ray Train splits the stream with `equal=True`, which drops the last rows when their
    count is not a multiple of the workers; weight-0 filler rows (`skip_reason` "filler",
    never persisted or counted) make it one, so no prompt is lost."""
    missing = -rows % workers
    if not missing:
        return stream
    fillers = {name: [filler_row().get(name)] * missing for name in STREAM_SCHEMA.names}
    return stream.union(ray.data.from_arrow(pa.Table.from_pydict(fillers, schema=STREAM_SCHEMA)))
