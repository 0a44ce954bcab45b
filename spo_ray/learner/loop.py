"""The learner: Ray Train workers running a DeepSpeed engine on the streamed pair rows.

Each worker reads its shard of the pair stream (`get_dataset_shard("pairs")`) as the
rollout and judge stages produce it, persists every row it receives to Parquet, and
trains. Rows without a pair (a `skip_reason`) still take their slot in a micro-batch
with weight 0, so every worker runs the same number of micro-steps and DeepSpeed's
collectives stay in lockstep; they are counted, never silently dropped. Every
`learner.checkpoint_every` steps the workers save a step checkpoint; a restarted worker
group (or a restarted driver) resumes from it without training a row twice in an epoch
(spo_ray/learner/resume.py).

Loss normalization: each micro-batch contributes Σ_pairs loss / micro_batch_size, and
DeepSpeed divides by the accumulation steps and averages over workers, so one optimizer
step applies Σ loss / global_batch_size — a short final step counts its pairs with the
same weight as any other.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from spo_ray.config import Config
from spo_ray.data.schema import FILLER, TokenStats, collate_pairs, filler_row, pair_table
from spo_ray.faults import maybe_fail
from spo_ray.learner.deepspeed_config import build_deepspeed_config, gradient_accumulation_steps, linear_schedule
from spo_ray.learner.resume import Position, deal, epoch_order, persisted_rows, restore, save_checkpoint
from spo_ray.run_dir import timeline_parts, write_json_atomic
from spo_ray.sppo import preference_loss, sequence_logps
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


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write-then-rename: a crash never leaves a half-written part that looks complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _micro_batches(rows: Iterator[dict], size: int) -> Iterator[list[dict]]:
    buf: list[dict] = []
    for row in rows:
        buf.append(row)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


class _PairSink:
    """Persists the rows a worker receives: pairs to `pairs/`, skipped prompts to `skipped/`
    (with their position in the batch, so a replay restores the arrival order). Part names
    sort by attempt, rank and batch."""

    def __init__(self, iter_dir: Path, rank: int) -> None:
        self.pairs_dir = iter_dir / "pairs"
        self.skipped_dir = iter_dir / "skipped"
        self.pairs_dir.mkdir(parents=True, exist_ok=True)
        self.skipped_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = f"part-{time.time_ns():020d}-r{rank:03d}"
        self.batches = 0

    def write(self, rows: list[dict]) -> None:
        name = f"{self.prefix}-{self.batches:05d}.parquet"
        self.batches += 1
        pairs = [r for r in rows if not r["skip_reason"]]
        skipped = [(i, r) for i, r in enumerate(rows) if r["skip_reason"]]
        if pairs:
            write_parquet_atomic(pair_table(pairs), self.pairs_dir / name)
        if skipped:
            table = pa.Table.from_pylist(
                [{"prompt_id": r["prompt_id"], "skip_reason": r["skip_reason"], "iteration": r["iteration"], "position": i} for i, r in skipped]
            )
            write_parquet_atomic(table, self.skipped_dir / name)


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


def _filler(rows: list[dict]) -> list[dict]:
    """Skipped rows and fillers keep their slot with a stand-in pair (weight 0 in the loss)."""
    stand_in = {"chosen": "", "rejected": "", "chosen_probs_win": 0.5, "chosen_probs_lose": 0.5}
    return [r if not r["skip_reason"] else {**r, **stand_in} for r in rows]


def _optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    l = cfg.learner
    if l.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=l.lr, weight_decay=l.weight_decay)
    return torch.optim.AdamW(params, lr=l.lr, weight_decay=l.weight_decay)


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


@dataclass
class LearnerModels:
    """What a worker trains with: the policy's DeepSpeed engine (training mode), the
    frozen reference π_t (eval mode), the tokenizer and the LR schedule."""

    tokenizer: Any
    engine: Any  # deepspeed.DeepSpeedEngine
    reference: torch.nn.Module
    scheduler: torch.optim.lr_scheduler.LRScheduler


def build_models(cfg: Config, policy_path: str, device: torch.device, world: int, total_steps: int) -> LearnerModels:
    """Policy and reference loaded from `policy_path`, the policy wrapped in a DeepSpeed
    engine. Needs torch.distributed initialized (Ray Train does it; a test can start a
    one-process gloo group)."""
    import deepspeed

    from spo_ray.modeling import load_policy, load_tokenizer

    l = cfg.learner
    tokenizer = load_tokenizer(policy_path, cfg.model.trust_remote_code)
    model = load_policy(policy_path, "float32", device, cfg.model.trust_remote_code)
    reference = load_policy(policy_path, "bfloat16" if l.bf16 else "float32", device, cfg.model.trust_remote_code)
    reference.eval().requires_grad_(False)  # π_t, frozen for the whole iteration
    if l.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    optimizer = _optimizer(cfg, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_schedule(s, total_steps, l.warmup_ratio))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=build_deepspeed_config(l, world),
        dist_init_required=False,
    )
    # from_pretrained returns the model in eval mode, and transformers recomputes activations
    # only when `gradient_checkpointing and self.training`: without this, checkpointing is a
    # no-op (and dropout is off).
    engine.train()
    return LearnerModels(tokenizer, engine, reference, scheduler)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry: one iteration's training of π_t into π_{t+1}, resumable
    (spo_ray/learner/resume.py): it starts from the newest step checkpoint, if any."""
    import ray.train

    cfg: Config = loop_config["cfg"]
    policy_path: str = loop_config["policy_path"]
    iter_dir = Path(loop_config["iter_dir"])
    iteration: int = loop_config["iteration"]
    num_prompts: int = loop_config["num_prompts"]
    timeline = timeline_parts(iter_dir)  # this worker's busy intervals (spo_ray/timeline.py)
    # From the driver's fit() to here: worker processes, their process group, this module's
    # imports. After a learner restart it spans the failed attempt too.
    record_interval(timeline, "learner_workers", loop_config["fit_at"], time.time())
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    l = cfg.learner
    use_gpu = cfg.cluster.learner.gpus_per_worker > 0
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if use_gpu else "cpu")
    torch.manual_seed(cfg.run.seed + rank)

    gas = gradient_accumulation_steps(l, world)
    total_steps = max(1, math.ceil(num_prompts / l.global_batch_size)) * l.epochs  # an upper bound: skipped prompts shorten it
    with span(timeline, "learner_models"):
        models = build_models(cfg, policy_path, device, world, total_steps)
    tokenizer, engine, reference, scheduler = models.tokenizer, models.engine, models.reference, models.scheduler

    # Resume: the newest step checkpoint and every row persisted so far (all ranks read the
    # same files before any rank persists new ones).
    position, checkpoint = restore(engine, iter_dir, rank)
    persisted = persisted_rows(iter_dir)
    persisted_ids = {r["prompt_id"] for r in persisted}
    if world > 1:
        torch.distributed.barrier()
    if rank == 0 and (checkpoint or persisted):
        print(
            f"[learner] iter {iteration}: resuming at step {position.step} (epoch {position.epoch + 1}) "
            f"from {checkpoint.name if checkpoint else 'π_t'}; {len(persisted)} rows already persisted",
            flush=True,
        )
    sink = _PairSink(iter_dir, rank)
    summary = LearnerSummary(steps=position.step, resumed_from_step=position.step)
    stats = _restored_stats(position, rank)
    metrics_path = iter_dir / "train_metrics.jsonl"
    started = time.time()
    shard = ray.train.get_dataset_shard("pairs")

    def epoch_rows(epoch: int, trained: set[str]) -> Iterator[dict]:
        if epoch == 0:  # persisted rows not yet trained on, in arrival order, then the stream
            replay = deal([r for r in persisted if r["prompt_id"] not in trained], rank, world)
            summary.replayed_rows += sum(r["skip_reason"] != FILLER for r in replay)
            yield from replay
            yield from _streamed_rows(shard, l.micro_batch_size, sink, persisted_ids, summary)
        else:  # every pair again, in an order fixed by the seed and the epoch
            if world > 1:
                torch.distributed.barrier()  # every rank's last parts of epoch 1 are on disk
            rows = epoch_order(persisted_rows(iter_dir), cfg.run.seed, iteration, epoch)
            yield from deal([r for r in rows if r["prompt_id"] not in trained], rank, world)

    def step_groups(rows: Iterator[dict]) -> Iterator[list[list[dict]]]:
        group: list[list[dict]] = []
        for micro in _micro_batches(rows, l.micro_batch_size):
            group.append(micro)
            if len(group) == gas:
                yield group
                group = []
        if group:
            yield group

    simulate_step_s = loop_config.get("simulate_step_s")  # benchmarks/overlap.py --simulate
    waiting = time.time()  # for the stream's first rows, then for each next step's, then for its end
    for epoch in range(position.epoch, l.epochs):
        trained = set(position.consumed) if epoch == position.epoch else set()
        if epoch != position.epoch:
            position.consumed = []
        for group in step_groups(epoch_rows(epoch, trained)):
            record_interval(timeline, "learner_wait", waiting, time.time())
            ids = [r["prompt_id"] for micro in group for r in micro if r["skip_reason"] != FILLER]
            if simulate_step_s is not None:  # the cost model: only the work is replaced
                summary.steps += 1
                with span(timeline, "learner_step"):
                    time.sleep(simulate_step_s)
                if rank == 0:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps({"step": summary.steps, "elapsed_s": round(time.time() - started, 2)}) + "\n")
                waiting = time.time()
                continue
            # The step's work only: the wait for its rows (the stream) is not in it.
            with span(timeline, "learner_step"):
                # Count truncations and untokenizable pairs once, in the streamed epoch.
                totals = _accumulate_gradients(engine, reference, tokenizer, group, l, device, stats if epoch == 0 else TokenStats())
                engine.step()
            summary.steps += 1
            if world > 1:
                torch.distributed.all_reduce(totals)
            step_ids = [i for rank_ids in _all_gather(ids, world) for i in rank_ids]
            position.step, position.epoch = summary.steps, epoch
            position.consumed += step_ids
            record = _step_record(totals, engine, scheduler, iteration, epoch, summary.steps, started)
            record["prompt_ids"] = step_ids  # what this step trained on (no repeats within an epoch)
            if rank == 0:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                if summary.steps % cfg.run.log_every == 0:
                    eta = _eta_s(time.time() - started, summary, total_steps)
                    print(
                        f"[learner] iter {record['iteration']} epoch {epoch + 1}/{l.epochs} "
                        f"step {summary.steps}/≤{total_steps} loss {record['loss']:.4g} "
                        f"a {record['chosen_logratio']:+.3f} b {record['rejected_logratio']:+.3f} "
                        f"lr {record['lr']:.2e} ETA {eta:.0f}s",
                        flush=True,
                    )
            if l.checkpoint_every and summary.steps % l.checkpoint_every == 0:
                with span(timeline, "learner_checkpoint"):
                    _record_stats(position, stats, world)
                    save_checkpoint(engine, iter_dir, position, rank, world)
            maybe_fail("learner_step")  # fault injection (spo_ray/faults.py)
            waiting = time.time()
    record_interval(timeline, "learner_wait", waiting, time.time())

    summary.prompts_truncated = stats.prompts_truncated
    summary.responses_truncated = stats.responses_truncated
    summary.skipped = dict(stats.reasons)  # pairs the tokenizer failed on (weight 0); see _finish
    with span(timeline, "save_policy"):
        _finish(engine, tokenizer, cfg, iter_dir, summary, rank, world, loop_config["out_dir"])
    if loop_config.get("engines") is not None:  # rollout.weight_sync=nccl: push π_{t+1} to the rollout engines
        from spo_ray.rollout.engines import push_weights

        agree = lambda ok: _all_gather(ok, world)[0]  # noqa: E731 - rank 0's word on every rank
        with span(timeline, "weight_sync"):
            pushed = push_weights(engine.module, cfg, loop_config["engines"], loop_config["out_dir"], rank, device, agree)
        if rank == 0:
            write_json_atomic(iter_dir / "weight_push.json", pushed)
    ray.train.report({"steps": summary.steps, "streamed_rows": summary.streamed_rows})


def _accumulate_gradients(engine, reference, tokenizer, group: list[list[dict]], l, device, stats: TokenStats) -> torch.Tensor:
    """Forward/backward of one optimizer step's micro-batches (DeepSpeed accumulates).

    Returns the step's sums (loss, a, b over weighted pairs; pairs; rows) for logging.
    """
    totals = torch.zeros(5, dtype=torch.float64)
    for i, micro in enumerate(group):
        weight = torch.tensor([0.0 if r["skip_reason"] else 1.0 for r in micro], device=device)
        batch = collate_pairs(_filler(micro), tokenizer, l.max_length, l.max_prompt_length, stats)
        batch = {k: v.to(device) for k, v in batch.items()}
        weight = weight * batch["valid"]  # a pair that failed to tokenize: weight 0
        engine.set_gradient_accumulation_boundary(i == len(group) - 1)
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
        with torch.no_grad():
            ref_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ref_logps = sequence_logps(ref_logits, batch["input_ids"], batch["loss_mask"])
        n = len(micro)
        per_pair = preference_loss(
            logps[:n], logps[n:], ref_logps[:n], ref_logps[n:],
            loss_type=l.loss, beta=l.beta,
            chosen_probs_win=batch["chosen_probs_win"], chosen_probs_lose=batch["chosen_probs_lose"],
        )
        engine.backward((per_pair * weight).sum() / l.micro_batch_size)
        a = (logps[:n] - ref_logps[:n]).detach()
        b = (logps[n:] - ref_logps[n:]).detach()
        totals += torch.tensor(
            [(per_pair.detach() * weight).sum(), (a * weight).sum(), (b * weight).sum(), weight.sum(), n],
            dtype=torch.float64,
        )
    return totals


def _step_record(totals: torch.Tensor, engine, scheduler, iteration: int, epoch: int, step: int, started: float) -> dict:
    grad_norm = engine.get_global_grad_norm()
    n_pairs = max(totals[3].item(), 1.0)
    return {
        "iteration": iteration,
        "epoch": epoch,
        "step": step,
        "loss": totals[0].item() / n_pairs,
        "chosen_logratio": totals[1].item() / n_pairs,  # a: log π_θ/π_t on chosen
        "rejected_logratio": totals[2].item() / n_pairs,  # b: on rejected
        "margin": (totals[1].item() - totals[2].item()) / n_pairs,
        "pairs": int(totals[3].item()),
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "lr": scheduler.get_last_lr()[0],
        "elapsed_s": round(time.time() - started, 2),
    }


def _finish(engine, tokenizer, cfg: Config, iter_dir: Path, summary: LearnerSummary, rank: int, world: int, out_dir: str) -> None:
    """Sum the counts over workers, count the persisted rows, save π_{t+1} (rank 0) as an HF folder."""
    from spo_ray.modeling import save_policy, torch_dtype

    summaries = _all_gather(asdict(summary), world)
    state_dict = engine._zero3_consolidated_16bit_state_dict() if cfg.learner.zero_stage == 3 else None
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
    write_json_atomic(iter_dir / "learner_summary.json", asdict(total))
