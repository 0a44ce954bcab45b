"""The learner: Ray Train workers running a DeepSpeed engine on the streamed pair rows.

Each worker reads its shard of the pair stream (`get_dataset_shard("pairs")`) as the
rollout and judge stages produce it, persists every row it receives to Parquet, and
trains. Rows without a pair (a `skip_reason`) still take their slot in a micro-batch
with weight 0, so every worker runs the same number of micro-steps and DeepSpeed's
collectives stay in lockstep; they are counted, never silently dropped. Every
`learner.checkpoint_every` steps the workers save a step checkpoint; a restarted worker
group (or a restarted driver) resumes from it without training a row twice in an epoch
(spo_ray/learner/resume.py).

The step itself (collate, log-probs, loss, backward, optimizer step) is
`spo_ray.learner.step.learner_step`, which runs without Ray; the models are built by
`spo_ray.learner.models.build_models`.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from spo_ray.config import Config
from spo_ray.data.schema import FILLER, TokenStats, filler_row, pair_table
from spo_ray.faults import maybe_fail
from spo_ray.learner.deepspeed_config import gradient_accumulation_steps, zero_stage
from spo_ray.learner.models import build_models
from spo_ray.learner.resume import Position, deal, epoch_order, persisted_rows, restore, save_checkpoint, shared_view
from spo_ray.learner.step import StepSums, learner_step, step_groups
from spo_ray.run_dir import IterationFiles, timeline_parts, write_json_atomic, write_then_rename
from spo_ray.timeline import record_interval, span


@dataclass
class LearnerSummary:
    """One iteration's counts. Rows, pairs and skips are counted from the persisted parts
    (so a restart neither loses nor doubles them); `streamed_rows` / `replayed_rows` say
    where the last attempt's first-epoch rows came from — the stream, or the persisted
    parts of an earlier attempt (a resumed run generates only what was never persisted)."""

    rows: int = 0
    pairs: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    streamed_rows: int = 0
    replayed_rows: int = 0
    resumed_from_step: int = 0


def _write_part(table: pa.Table, path: Path) -> None:
    """A crash never leaves a half-written part that looks complete (run_dir.write_then_rename)."""
    with write_then_rename(path) as tmp:
        pq.write_table(table, tmp)


class _PairSink:
    """Persists the rows a worker receives: pairs to `pairs/`, skipped prompts to `skipped/`
    (with their position in the batch, so a replay restores the arrival order). Part names
    sort by attempt, rank and batch."""

    def __init__(self, iter_dir: Path, rank: int) -> None:
        files = IterationFiles(iter_dir)
        self.pairs_dir, self.skipped_dir = files.pairs, files.skipped
        self.pairs_dir.mkdir(parents=True, exist_ok=True)
        self.skipped_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = f"part-{time.time_ns():020d}-r{rank:03d}"
        self.batches = 0
        self.written: list[tuple[str, bool, bool]] = []  # (part, pairs?, skipped?): resume.persisted_rows

    def write(self, rows: list[dict]) -> None:
        name = f"{self.prefix}-{self.batches:05d}.parquet"
        self.batches += 1
        pairs = [r for r in rows if not r["skip_reason"]]
        skipped = [(i, r) for i, r in enumerate(rows) if r["skip_reason"]]
        if pairs:
            _write_part(pair_table(pairs), self.pairs_dir / name)
        if skipped:
            table = pa.Table.from_pylist(
                [{"prompt_id": r["prompt_id"], "skip_reason": r["skip_reason"], "iteration": r["iteration"], "position": i} for i, r in skipped]
            )
            _write_part(table, self.skipped_dir / name)
        self.written.append((name, bool(pairs), bool(skipped)))


def _streamed_rows(shard, batch_size: int, sink: _PairSink, persisted: set[str], summary: LearnerSummary) -> Iterator[dict]:
    """The stream's rows, persisted as they arrive. A row whose prompt an earlier attempt
    already persisted (the stream leaves those out; this is the safety net, e.g. for a
    materialized stream) becomes a filler, so the ranks stay in lockstep."""
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=1):
        rows = [r if r["prompt_id"] not in persisted else filler_row() for r in batch.to_pylist()]
        fresh = [r for r in rows if r["skip_reason"] != FILLER]
        if fresh:
            sink.write(fresh)
        summary.streamed_rows += len(fresh)
        yield from rows


def _all_gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _eta_s(elapsed_s: float, summary: LearnerSummary, total_steps: int) -> float:
    """Seconds to `total_steps` at this attempt's pace: `elapsed_s` covers only the steps
    taken since the resume, not those before the checkpoint."""
    return elapsed_s / max(1, summary.steps - summary.resumed_from_step) * max(0, total_steps - summary.steps)


def _restored_stats(position: Position, rank: int) -> TokenStats:
    """The token counts up to the checkpoint, held by rank 0 alone (the ranks' counts are
    summed at the end, so each is counted once)."""
    if rank != 0:
        return TokenStats()
    return TokenStats(
        prompts_truncated=position.prompts_truncated, responses_truncated=position.responses_truncated, reasons=dict(position.reasons)
    )


def _record_stats(position: Position, stats: TokenStats, world: int) -> None:
    """All ranks: every rank's token counts so far, summed into the position a checkpoint saves."""
    gathered = _all_gather(asdict(stats), world)
    position.prompts_truncated = sum(s["prompts_truncated"] for s in gathered)
    position.responses_truncated = sum(s["responses_truncated"] for s in gathered)
    position.reasons = {}
    for s in gathered:
        for reason, n in s["reasons"].items():
            position.reasons[reason] = position.reasons.get(reason, 0) + n


@dataclass(frozen=True)
class LoopConfig:
    """What the driver hands the learner workers for one iteration. Ray Train's API takes a
    dict: `train_loop_config={"loop": LoopConfig(...)}`."""

    cfg: Config
    policy_path: str  # π_t: the policy to train and the frozen reference
    iter_dir: str
    out_dir: str  # where π_{t+1} is saved (an HF folder)
    num_prompts: int
    iteration: int
    fit_at: float  # the driver's time at fit(): the workers' start-up is timed from it
    engines: Any = None  # rollout.weight_sync=nccl: the rollout engines π_{t+1} is pushed to
    step: Callable[..., StepSums] = learner_step  # benchmarks/overlap.py --simulate swaps the work for a cost


class _EpochRows:
    """This rank's rows of each epoch (spo_ray/learner/resume.py): epoch 1 replays the
    persisted rows not yet trained on, in arrival order, then reads the stream (persisting
    it); later epochs read every persisted pair again, in an order fixed by the seed."""

    def __init__(self, job: LoopConfig, shard, rank: int, world: int, summary: LearnerSummary) -> None:
        self.job, self.shard, self.rank, self.world, self.summary = job, shard, rank, world, summary
        self.iter_dir = Path(job.iter_dir)
        self.view = shared_view(rank, world, job.cfg.run.timeouts.shared_fs_s)  # rank 0 lists for all
        self.persisted = persisted_rows(self.iter_dir, self.view)  # listed before any rank persists more
        self.sink = _PairSink(self.iter_dir, rank)

    def __call__(self, epoch: int, trained: set[str]) -> Iterator[dict]:
        if epoch == 0:
            replay = deal([r for r in self.persisted if r["prompt_id"] not in trained], self.rank, self.world)
            self.summary.replayed_rows += sum(r["skip_reason"] != FILLER for r in replay)
            yield from replay
            persisted_ids = {r["prompt_id"] for r in self.persisted}
            yield from _streamed_rows(self.shard, self.job.cfg.learner.micro_batch_size, self.sink, persisted_ids, self.summary)
        else:
            if self.world > 1:
                torch.distributed.barrier()  # every rank's last parts of epoch 1 are on disk
            rows = epoch_order(persisted_rows(self.iter_dir, self.view, self.sink.written), self.job.cfg.run.seed, self.job.iteration, epoch)
            yield from deal([r for r in rows if r["prompt_id"] not in trained], self.rank, self.world)


def total_steps(job: LoopConfig) -> int:
    """Optimizer steps of the iteration, for the LR schedule: an upper bound (skipped prompts shorten it)."""
    l = job.cfg.learner
    return max(1, math.ceil(job.num_prompts / l.global_batch_size)) * l.epochs


def worker_device(cfg: Config) -> torch.device:
    """The worker's device; on CPU also its torch threads (`learner.num_threads`; else Ray's
    OMP_NUM_THREADS, one per CPU the worker reserves: 1 for the local preset's 0.5 CPU)."""
    import ray.train

    if cfg.cluster.learner.gpus_per_worker > 0:
        return torch.device(f"cuda:{ray.train.get_context().get_local_rank()}")
    if cfg.learner.num_threads:
        torch.set_num_threads(cfg.learner.num_threads)
    return torch.device("cpu")


class StartedShard:
    """A worker's shard of the pair stream, started at once: a thread asks for its first
    batch, so the stream's stage actors start and generate while the worker still loads its
    models (Ray Data starts a split stream only when every worker asks). Rows are persisted
    and trained only where `iter_batches` is read, as for any shard."""

    def __init__(self, shard, batch_size: int) -> None:
        self.batches = iter(shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=1))
        self.first: list = []
        self.error: list[BaseException] = []
        self.thread = threading.Thread(target=self._pull_first, daemon=True)
        self.thread.start()

    def _pull_first(self) -> None:
        try:
            self.first.append(next(self.batches))
        except StopIteration:
            pass
        except BaseException as err:  # noqa: BLE001 - raised where the batches are read
            self.error.append(err)

    def iter_batches(self, **_) -> Iterator[pa.Table]:
        self.thread.join()
        if self.error:
            raise self.error[0]
        yield from self.first
        yield from self.batches


def train_loop_per_worker(loop_config: dict[str, LoopConfig]) -> None:
    """Ray Train entry of the per-iteration learner (`learner.persistent=false`): build the
    models from π_t, then `train_iteration`."""
    import ray.train

    job = loop_config["loop"]
    cfg = job.cfg
    timeline = timeline_parts(job.iter_dir)  # this worker's busy intervals (spo_ray/timeline.py)
    # From the driver's fit() to here: worker processes, their process group, this module's
    # imports. After a learner restart it spans the failed attempt too.
    record_interval(timeline, "learner_workers", job.fit_at, time.time())
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device(cfg)
    torch.manual_seed(cfg.run.seed + rank)
    gradient_accumulation_steps(cfg.learner, world)  # raises before any model is loaded
    shard = StartedShard(ray.train.get_dataset_shard("pairs"), cfg.learner.micro_batch_size)
    with span(timeline, "learner_models"):
        models = build_models(cfg, job.policy_path, device, world, total_steps(job))
    summary = train_iteration(job, models, shard, rank, world, device)
    ray.train.report({"steps": summary.steps, "streamed_rows": summary.streamed_rows})


def train_iteration(job: LoopConfig, models, shard, rank: int, world: int, device: torch.device) -> LearnerSummary:
    """One iteration's training of π_t (held by `models`) into π_{t+1}, saved to
    `job.out_dir`; resumable (spo_ray/learner/resume.py): it starts from the newest step
    checkpoint, if any. `shard`: this worker's part of the pair stream."""
    cfg, l, iter_dir = job.cfg, job.cfg.learner, Path(job.iter_dir)
    timeline = timeline_parts(iter_dir)
    torch.manual_seed(cfg.run.seed + rank)  # both learners draw the same numbers in each iteration
    # Resume: the newest step checkpoint and every row persisted so far.
    position, checkpoint = restore(models.engine, iter_dir, shared_view(rank, world, cfg.run.timeouts.shared_fs_s))
    summary = LearnerSummary(steps=position.step, resumed_from_step=position.step)
    epoch_rows = _EpochRows(job, shard, rank, world, summary)
    if world > 1:
        torch.distributed.barrier()
    if rank == 0 and (checkpoint or epoch_rows.persisted):
        print(
            f"[learner] iter {job.iteration}: resuming at step {position.step} (epoch {position.epoch + 1}) "
            f"from {checkpoint.name if checkpoint else 'π_t'}; {len(epoch_rows.persisted)} rows already persisted",
            flush=True,
        )
    stats = _restored_stats(position, rank)
    _train_epochs(job, models, epoch_rows, position, stats, summary, rank, world)
    summary.prompts_truncated, summary.responses_truncated = stats.prompts_truncated, stats.responses_truncated
    summary.skipped = dict(stats.reasons)  # pairs the tokenizer failed on (weight 0); see _finish
    with span(timeline, "save_policy"):
        _finish(models.engine, models.tokenizer, cfg, iter_dir, summary, rank, world, job.out_dir)
    if job.engines is not None:
        _push_weights(job, models.engine, rank, world, device)
    return summary


def _train_epochs(
    job: LoopConfig, models, epoch_rows: _EpochRows, position: Position, stats: TokenStats, summary: LearnerSummary, rank: int, world: int
) -> None:
    """The optimizer steps of the epochs from `position` on, with step checkpoints."""
    l, iter_dir = job.cfg.learner, Path(job.iter_dir)
    timeline = timeline_parts(iter_dir)
    accumulation = gradient_accumulation_steps(l, world)
    progress = _Progress(job, rank, total_steps(job), summary)
    waiting = time.time()  # for the stream's first rows, then for each next step's, then for its end
    for epoch in range(position.epoch, l.epochs):
        trained = set(position.consumed) if epoch == position.epoch else set()
        if epoch != position.epoch:
            position.consumed = []
        for group in step_groups(epoch_rows(epoch, trained), l.micro_batch_size, accumulation):
            record_interval(timeline, "learner_wait", waiting, time.time())
            ids = [r["prompt_id"] for micro in group for r in micro if r["skip_reason"] != FILLER]
            with span(timeline, "learner_step"):  # the step's work only, not the wait for its rows
                # Truncations and untokenizable pairs are counted once, in the streamed epoch.
                sums = job.step(models, group, l, stats if epoch == 0 else TokenStats())
            summary.steps += 1
            step_ids = [i for rank_ids in _all_gather(ids, world) for i in rank_ids]
            position.step, position.epoch = summary.steps, epoch
            position.consumed += step_ids
            progress.log(_summed(sums, world, models.engine.device), models.scheduler, epoch, step_ids)
            if l.checkpoint_every and summary.steps % l.checkpoint_every == 0:
                with span(timeline, "learner_checkpoint"):
                    _record_stats(position, stats, world)
                    save_checkpoint(models.engine, iter_dir, position, rank, world)
            maybe_fail("learner_step")  # fault injection (spo_ray/faults.py)
            waiting = time.time()
    record_interval(timeline, "learner_wait", waiting, time.time())


def _push_weights(job: LoopConfig, engine, rank: int, world: int, device: torch.device) -> None:
    """rollout.weight_sync=nccl: π_{t+1} straight into the rollout engines."""
    from spo_ray.rollout.engines import push_weights

    agree = lambda ok: _all_gather(ok, world)[0]  # noqa: E731 - rank 0's word on every rank
    with span(timeline_parts(job.iter_dir), "weight_sync"):
        pushed = push_weights(engine.module, job.cfg, job.engines, job.out_dir, rank, device, agree)
    if rank == 0:
        write_json_atomic(IterationFiles(Path(job.iter_dir)).weight_push, pushed)


def _summed(sums: StepSums, world: int, device: torch.device) -> StepSums:
    """The step's sums over all workers (the gradient norm is global already)."""
    if world == 1:
        return sums
    totals = torch.tensor(
        [sums.loss, sums.chosen_logratio, sums.rejected_logratio, sums.pairs, sums.rows], dtype=torch.float64, device=device
    )
    torch.distributed.all_reduce(totals)
    return StepSums(*totals.tolist(), grad_norm=sums.grad_norm)


class _Progress:
    """Rank 0 writes each step's record to train_metrics.jsonl and, every `run.log_every`
    steps, a progress line with the ETA."""

    def __init__(self, job: LoopConfig, rank: int, total_steps: int, summary: LearnerSummary) -> None:
        self.job, self.rank, self.total_steps, self.summary = job, rank, total_steps, summary
        self.path = IterationFiles(Path(job.iter_dir)).train_metrics
        self.started = time.time()

    def log(self, sums: StepSums, scheduler, epoch: int, step_ids: list[str]) -> None:
        if self.rank != 0:
            return
        n_pairs = max(sums.pairs, 1.0)
        record = {
            "iteration": self.job.iteration,
            "epoch": epoch,
            "step": self.summary.steps,
            "loss": sums.loss / n_pairs,
            "chosen_logratio": sums.chosen_logratio / n_pairs,  # a: log π_θ/π_t on chosen
            "rejected_logratio": sums.rejected_logratio / n_pairs,  # b: on rejected
            "margin": (sums.chosen_logratio - sums.rejected_logratio) / n_pairs,
            "pairs": int(sums.pairs),
            "grad_norm": sums.grad_norm,
            "lr": scheduler.get_last_lr()[0],
            "elapsed_s": round(time.time() - self.started, 2),
            "prompt_ids": step_ids,  # what this step trained on (no repeats within an epoch)
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.summary.steps % self.job.cfg.run.log_every == 0:
            eta = _eta_s(time.time() - self.started, self.summary, self.total_steps)
            print(
                f"[learner] iter {self.job.iteration} epoch {epoch + 1}/{self.job.cfg.learner.epochs} "
                f"step {self.summary.steps}/≤{self.total_steps} loss {record['loss']:.4g} "
                f"a {record['chosen_logratio']:+.3f} b {record['rejected_logratio']:+.3f} "
                f"lr {record['lr']:.2e} ETA {eta:.0f}s",
                flush=True,
            )


def _finish(engine, tokenizer, cfg: Config, iter_dir: Path, summary: LearnerSummary, rank: int, world: int, out_dir: str) -> None:
    """Sum the counts over workers, count the persisted rows, save π_{t+1} (rank 0) as an HF folder."""
    from spo_ray.dtypes import torch_dtype
    from spo_ray.modeling import save_policy

    summaries = _all_gather(asdict(summary), world)
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero_stage(cfg.learner, world) == 3 else None
    if rank != 0:
        return
    total = LearnerSummary(steps=summary.steps, resumed_from_step=summary.resumed_from_step)
    for key in ("prompts_truncated", "responses_truncated", "streamed_rows", "replayed_rows"):
        setattr(total, key, sum(s[key] for s in summaries))
    for row in persisted_rows(iter_dir):
        total.rows += 1
        if row["skip_reason"]:
            total.skipped[row["skip_reason"]] = total.skipped.get(row["skip_reason"], 0) + 1
        else:
            total.pairs += 1
    for s in summaries:  # persisted as pairs, but the tokenizer failed on them: trained with weight 0
        for reason, n in s["skipped"].items():
            total.skipped[reason] = total.skipped.get(reason, 0) + n
            total.pairs -= n
    if state_dict is None:
        state_dict = engine.module.state_dict()
    dtype = torch_dtype(cfg.model.dtype)
    engine.module.config.use_cache = True
    save_policy(engine.module, tokenizer, out_dir, state_dict={k: v.to(dtype) for k, v in state_dict.items()})
    write_json_atomic(IterationFiles(iter_dir).learner_summary, asdict(total))
