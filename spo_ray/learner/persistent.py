"""The persistent learner (`learner.persistent=true`): one Ray Train run for the whole run.

Its workers start once, build tokenizer, policy engine and reference once, keep their
process group, and train one iteration after the other:

    driver (PersistentLearner.train)              LearnerCoordinator (actor)     workers
    ── job t + the stream of iteration t ────────► job, stream (1st attempt) ◄── next job, claim
                                                                                  train (loop.py)
    ◄── done t ──────────────────────────────────  done ◄──────────────────────── finished t
    ── job t+1 + its stream ─────────────────────► ...                            π_{t+1} into the
                                                                                  reference, fresh
                                                                                  optimizer + LR
The driver builds each iteration's stream as soon as the iteration starts, one iterator per
worker (`streaming_split`, whose iterators may be handed to other processes; a single
worker gets the dataset's own iterator and runs the stream itself), and each worker starts
reading it at once (`StartedShard`), so its stages start while the learner is still loading
(iteration 1) or at once (later).

Faults, as with the per-iteration learner: a lost worker makes Ray Train restart the worker
group (up to learner.max_failures × run.iterations times per run); the new workers load π_t
from iter_<t-1>/policy, ask for the current job, and claim a stream; the one they find was
read by the lost group, so the coordinator asks the driver for a fresh one, which holds only
the prompts not yet persisted (`spo_ray.pipeline.remaining_pair_stream`), and the workers
resume from the iteration's step checkpoint (spo_ray/learner/resume.py). A killed driver
takes the run's Ray Train run with it; the same command with the same run.dir starts a new
one at the first unfinished iteration.

What differs from a learner started per iteration: nothing with one worker (ZeRO stage 0):
at an iteration's start the policy is rounded to model.dtype in place, as the saved
π_{t+1} that the per-iteration learner would load, and the reference takes its weights.
With ZeRO 1–3 the optimizer keeps the float32 master weights, which stay unrounded: with
model.dtype=float32 (the learner's dtype on CPU) that changes nothing either.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Callable

import ray
import torch

from spo_ray.config import Config
from spo_ray.learner.deepspeed_config import gradient_accumulation_steps, linear_schedule, zero_stage
from spo_ray.learner.loop import LoopConfig, StartedShard, _all_gather, total_steps, train_iteration, worker_device
from spo_ray.learner.models import build_models
from spo_ray.learner.step import LearnerModels
from spo_ray.run_dir import timeline_parts
from spo_ray.timeline import record_interval, span

log = logging.getLogger(__name__)
POLL_S = 0.2  # how often a waiting worker or the driver asks the coordinator


@ray.remote(num_cpus=0)
class LearnerCoordinator:
    """The mailbox between the driver and the persistent workers: the current iteration's
    job, its newest stream (one per worker-group attempt), the iterations done."""

    def __init__(self) -> None:
        self.job: LoopConfig | None = None
        self.stream: tuple[int, list] | None = None  # (generation, one split iterator per worker)
        self.generations = 0
        self.claimed = 0  # the newest generation a worker group has claimed
        self.wanted = False  # a worker group found no unread stream: the driver makes one
        self.done: set[int] = set()
        self.closed = False

    def start(self, job: LoopConfig, splits: list) -> None:
        self.job = job
        self.offer(splits)

    def offer(self, splits: list) -> None:
        self.generations += 1
        self.stream, self.wanted = (self.generations, splits), False  # an older stream's actors end with it

    def next_job(self, after: int) -> tuple[str, LoopConfig | None]:
        """("job", the current job) unless its iteration is `after` or done; ("wait", None); ("closed", None)."""
        if self.closed:
            return "closed", None
        if self.job is not None and self.job.iteration != after and self.job.iteration not in self.done:
            return "job", self.job
        return "wait", None

    def claim(self, iteration: int) -> int | None:
        """A worker group's rank 0: the generation of an unread stream of `iteration`, or
        None (then the driver is asked for a fresh one)."""
        if self.job is None or self.job.iteration != iteration:
            return None
        if self.stream is not None and self.stream[0] > self.claimed:
            self.claimed = self.stream[0]
            return self.claimed
        self.wanted = True
        return None

    def split(self, generation: int, rank: int):
        if self.stream is None or self.stream[0] != generation:
            raise RuntimeError(f"learner: stream generation {generation} was replaced before rank {rank} took its split")
        return self.stream[1][rank]

    def finished(self, iteration: int) -> None:
        self.done.add(iteration)
        self.stream = None

    def status(self, iteration: int) -> dict:
        return {"done": iteration in self.done, "wanted": self.wanted}

    def close(self) -> None:
        self.closed = True


# ---------------------------------------------------------------------------- worker side
def persistent_loop_per_worker(config: dict) -> None:
    """Ray Train entry: the jobs the coordinator hands out, one iteration after another,
    until the driver closes it."""
    import ray.train

    coordinator, started_at = config["coordinator"], config["started_at"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    models, holds, after = None, None, 0  # the models, the policy folder they hold, the last job done
    while (job := _next_job(coordinator, after)) is not None:
        cfg, timeline = job.cfg, timeline_parts(job.iter_dir)
        if models is None:  # once per worker process: its start counts in the iteration it joins
            record_interval(timeline, "learner_workers", max(started_at, job.fit_at), time.time())
        gradient_accumulation_steps(cfg.learner, world)  # raises before any model is loaded
        device = worker_device(cfg)
        shard = StartedShard(_claim_shard(coordinator, job, rank, world), cfg.learner.micro_batch_size)
        if models is not None and holds == job.policy_path:
            with span(timeline, "learner_reset"):
                models = next_iteration(models, cfg, world, total_steps(job))
        else:
            with span(timeline, "learner_models"):
                models = build_models(cfg, job.policy_path, device, world, total_steps(job))
        train_iteration(job, models, shard, rank, world, device)
        holds, after = job.out_dir, job.iteration
        if world > 1:
            torch.distributed.barrier()  # every rank is done with the iteration
        if rank == 0:
            ray.get(coordinator.finished.remote(job.iteration))


def _next_job(coordinator, after: int) -> LoopConfig | None:
    while True:
        state, job = ray.get(coordinator.next_job.remote(after))
        if state != "wait":
            return job
        time.sleep(POLL_S)


def _claim_shard(coordinator, job: LoopConfig, rank: int, world: int):
    """This worker's split of a stream no earlier worker group has read (rank 0 claims it)."""
    generation = None
    if rank == 0:
        while (generation := ray.get(coordinator.claim.remote(job.iteration))) is None:
            time.sleep(POLL_S)
    generation = _all_gather(generation, world)[0]
    return ray.get(coordinator.split.remote(generation, rank))


def next_iteration(models: LearnerModels, cfg: Config, world: int, steps: int) -> LearnerModels:
    """Models that hold π_{t+1} after training, made ready to train it: the policy rounded to
    model.dtype in place as it was saved (ZeRO stage 0: its parameters are the master
    weights), the frozen reference set to it, a fresh optimizer state and LR schedule of
    `steps` steps (the paper's scripts start each iteration's optimizer anew)."""
    from spo_ray.modeling import torch_dtype

    engine, stage = models.engine, zero_stage(cfg.learner, world)
    saved = torch_dtype(cfg.model.dtype)
    reference = dict(models.reference.named_parameters())
    with torch.no_grad(), _gathered(engine.module, stage):
        for name, param in engine.module.named_parameters():
            if stage == 0:
                param.copy_(param.to(saved))
            reference[name].copy_(param)
    engine.module.config.use_cache = False  # saving π_{t+1} turned it on
    engine.train()
    optimizer = models.scheduler.optimizer  # the torch optimizer (inside DeepSpeed's wrapper, if any)
    optimizer.state.clear()  # torch creates each parameter's state again at its first step
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_schedule(s, steps, cfg.learner.warmup_ratio))
    engine.lr_scheduler = scheduler
    return replace(models, scheduler=scheduler)


def _gathered(module: torch.nn.Module, stage: int):
    """ZeRO-3 partitions the parameters: gather them (read-only) while they are copied."""
    if stage != 3:
        from contextlib import nullcontext

        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


# ---------------------------------------------------------------------------- driver side
class PersistentLearner:
    """The driver's handle on the run's Ray Train run: `train` one iteration at a time,
    `close` at the end. `make_trainer(train_fn, config)` builds the TorchTrainer
    (spo_ray/train.py); its `fit()` runs in a thread of the driver for the whole run."""

    def __init__(self, make_trainer: Callable, num_workers: int) -> None:
        self.num_workers = num_workers
        self.coordinator = LearnerCoordinator.remote()
        trainer = make_trainer(persistent_loop_per_worker, {"coordinator": self.coordinator, "started_at": time.time()})
        self.outcome: dict = {}
        self.thread = threading.Thread(target=self._fit, args=(trainer,), name="spo_ray-learner", daemon=True)
        self.thread.start()

    def _fit(self, trainer) -> None:
        try:
            self.outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - handed to the driver's thread by `train`
            self.outcome["error"] = err

    def train(self, job: LoopConfig, pairs: Callable[[], ray.data.Dataset]) -> BaseException | None:
        """Iteration `job.iteration`: hand the workers the job and the stream `pairs()` (again
        whenever a restarted worker group asks), wait until they are done. Returns None, or
        the error that ended the Ray Train run (as `Result.error`)."""
        ray.get(self.coordinator.start.remote(job, self._splits(pairs)))
        while True:
            status = ray.get(self.coordinator.status.remote(job.iteration))
            if status["done"]:
                return None
            if not self.thread.is_alive():
                return self._ended()
            if status["wanted"]:
                log.warning("iteration %d: the learner's workers restarted; streaming the prompts not yet persisted", job.iteration)
                ray.get(self.coordinator.offer.remote(self._splits(pairs)))
            time.sleep(POLL_S)

    def _splits(self, pairs: Callable[[], ray.data.Dataset]) -> list:
        """One iterator of the stream per worker. A single worker gets the dataset's own
        iterator and runs the stream in its process; `streaming_split` would start its
        coordinator actor, a new process that imports the stream's code (≈ 3.5 s of each
        iteration on a 2-CPU machine, benchmarks/overlap.py)."""
        stream = pairs()
        if self.num_workers == 1:
            return [stream.iterator()]
        return stream.streaming_split(self.num_workers, equal=True)

    def _ended(self) -> BaseException:
        if "error" in self.outcome:
            return self.outcome["error"]
        result = self.outcome.get("result")
        if result is not None and result.error is not None:
            return result.error
        return RuntimeError("the learner's Ray Train run ended before the iteration was done")

    def close(self, timeout_s: float = 60.0) -> None:
        """Let the workers return after their current job and wait for the run to end."""
        try:
            ray.get(self.coordinator.close.remote(), timeout=timeout_s)
        except Exception as err:  # noqa: BLE001 - the run is over either way
            log.warning("learner: could not close the coordinator: %s", err)
            return
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            log.warning("learner: its Ray Train run did not end within %.0fs of close", timeout_s)
