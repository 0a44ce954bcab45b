"""The learner: Ray Train workers running a DeepSpeed engine on the streamed pair rows.

Each worker reads its shard of the pair stream (`get_dataset_shard("pairs")`) as the
rollout and judge stages produce it, persists every row it receives to Parquet, and
trains. Rows without a pair (a `skip_reason`) still take their slot in a micro-batch
with weight 0, so every worker runs the same number of micro-steps and DeepSpeed's
collectives stay in lockstep; they are counted, never silently dropped.

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
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from spo_ray.config import Config
from spo_ray.data.schema import PAIR_COLUMNS, TokenStats, collate_pairs, pair_table
from spo_ray.faults import maybe_fail
from spo_ray.learner.deepspeed_config import build_deepspeed_config, gradient_accumulation_steps, linear_schedule
from spo_ray.sppo import preference_loss, sequence_logps


@dataclass
class LearnerSummary:
    """What one worker saw in one iteration; rank 0 writes the sum across workers."""

    rows: int = 0
    pairs: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0

    def count(self, group: list[list[dict]]) -> None:
        for row in (r for micro in group for r in micro):
            self.rows += 1
            if row["skip_reason"]:
                self.skipped[row["skip_reason"]] = self.skipped.get(row["skip_reason"], 0) + 1
            else:
                self.pairs += 1


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
    """Persists the rows a worker receives: pairs to `pairs/`, skipped prompts to `skipped/`."""

    def __init__(self, iter_dir: Path, rank: int) -> None:
        self.pairs_dir = iter_dir / "pairs"
        self.skipped_dir = iter_dir / "skipped"
        self.pairs_dir.mkdir(parents=True, exist_ok=True)
        self.skipped_dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.parts: list[Path] = []
        self.skipped: list[dict] = []
        self.batches = 0

    def write(self, rows: list[dict]) -> None:
        n = self.batches
        self.batches += 1
        pairs = [r for r in rows if not r["skip_reason"]]
        skipped = [r for r in rows if r["skip_reason"]]
        if pairs:
            path = self.pairs_dir / f"part-r{self.rank}-{n:05d}.parquet"
            write_parquet_atomic(pair_table(pairs), path)
            self.parts.append(path)
        if skipped:
            self.skipped += [{"prompt": "", **r} for r in skipped]
            table = pa.Table.from_pylist(
                [{"prompt_id": r["prompt_id"], "skip_reason": r["skip_reason"], "iteration": r["iteration"]} for r in skipped]
            )
            write_parquet_atomic(table, self.skipped_dir / f"part-r{self.rank}-{n:05d}.parquet")

    def reread(self) -> Iterator[dict]:
        """This worker's rows again, for epochs after the first: its persisted pairs, then
        its skipped rows (weight 0), so every worker runs as many micro-steps as in epoch 1."""
        for path in self.parts:
            for row in pq.read_table(path).to_pylist():
                yield {**row, "skip_reason": ""}
        yield from self.skipped


def _streamed_rows(shard, batch_size: int, sink: _PairSink) -> Iterator[dict]:
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=1):
        rows = batch.to_pylist()
        sink.write(rows)
        yield from rows


def _filler(rows: list[dict]) -> list[dict]:
    """Skipped rows keep their slot with a stand-in pair (weight 0 in the loss)."""
    stand_in = {"chosen": "", "rejected": "", "chosen_probs_win": 0.5, "chosen_probs_lose": 0.5}
    return [r if not r["skip_reason"] else {**r, **stand_in} for r in rows]


def _optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    l = cfg.learner
    if l.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=l.lr, weight_decay=l.weight_decay)
    return torch.optim.AdamW(params, lr=l.lr, weight_decay=l.weight_decay)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry: one iteration's training of π_t into π_{t+1}."""
    import deepspeed
    import ray.train

    from spo_ray.modeling import load_policy, load_tokenizer

    cfg: Config = loop_config["cfg"]
    policy_path: str = loop_config["policy_path"]
    iter_dir = Path(loop_config["iter_dir"])
    num_prompts: int = loop_config["num_prompts"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    l = cfg.learner
    use_gpu = cfg.cluster.learner.gpus_per_worker > 0
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if use_gpu else "cpu")
    torch.manual_seed(cfg.run.seed + rank)

    tokenizer = load_tokenizer(policy_path, cfg.model.trust_remote_code)
    model = load_policy(policy_path, "float32", device, cfg.model.trust_remote_code)
    reference = load_policy(policy_path, "bfloat16" if l.bf16 else "float32", device, cfg.model.trust_remote_code)
    reference.eval().requires_grad_(False)  # π_t, frozen for the whole iteration
    if l.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False

    gas = gradient_accumulation_steps(l, world)
    steps_per_epoch = max(1, math.ceil(num_prompts / l.global_batch_size))
    total_steps = steps_per_epoch * l.epochs  # an upper bound: skipped prompts shorten it
    optimizer = _optimizer(cfg, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: linear_schedule(s, total_steps, l.warmup_ratio)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=build_deepspeed_config(l, world),
        dist_init_required=False,
    )

    sink = _PairSink(iter_dir, rank)
    summary = LearnerSummary()
    stats = TokenStats()
    metrics_path = iter_dir / "train_metrics.jsonl"
    started = time.time()
    shard = ray.train.get_dataset_shard("pairs")

    def step_groups(epoch: int) -> Iterator[list[list[dict]]]:
        rows = _streamed_rows(shard, l.micro_batch_size, sink) if epoch == 0 else sink.reread()
        group: list[list[dict]] = []
        for micro in _micro_batches(rows, l.micro_batch_size):
            group.append(micro)
            if len(group) == gas:
                yield group
                group = []
        if group:
            yield group

    simulate_step_s = loop_config.get("simulate_step_s")  # benchmarks/overlap.py --simulate
    for epoch in range(l.epochs):
        for group in step_groups(epoch):
            if epoch == 0:
                summary.count(group)
            if simulate_step_s is not None:  # the cost model: only the work is replaced
                summary.steps += 1
                time.sleep(simulate_step_s)
                if rank == 0:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps({"step": summary.steps, "elapsed_s": round(time.time() - started, 2)}) + "\n")
                continue
            totals = _accumulate_gradients(engine, reference, tokenizer, group, l, device, stats)
            engine.step()
            summary.steps += 1
            if world > 1:
                torch.distributed.all_reduce(totals)
            record = _step_record(totals, engine, scheduler, loop_config["iteration"], epoch, summary.steps, started)
            if rank == 0:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                if summary.steps % cfg.run.log_every == 0:
                    eta = (time.time() - started) / summary.steps * max(0, total_steps - summary.steps)
                    print(
                        f"[learner] iter {record['iteration']} epoch {epoch + 1}/{l.epochs} "
                        f"step {summary.steps}/≤{total_steps} loss {record['loss']:.4g} "
                        f"a {record['chosen_logratio']:+.3f} b {record['rejected_logratio']:+.3f} "
                        f"lr {record['lr']:.2e} ETA {eta:.0f}s",
                        flush=True,
                    )
            maybe_fail("learner_step")  # fault injection (spo_ray/faults.py)

    summary.prompts_truncated = stats.prompts_truncated
    summary.responses_truncated = stats.responses_truncated
    _finish(engine, tokenizer, cfg, iter_dir, summary, rank, world, loop_config["out_dir"])
    ray.train.report({"steps": summary.steps, "pairs": summary.pairs})


def _accumulate_gradients(engine, reference, tokenizer, group: list[list[dict]], l, device, stats: TokenStats) -> torch.Tensor:
    """Forward/backward of one optimizer step's micro-batches (DeepSpeed accumulates).

    Returns the step's sums (loss, a, b over weighted pairs; pairs; rows) for logging.
    """
    totals = torch.zeros(5, dtype=torch.float64)
    for i, micro in enumerate(group):
        weight = torch.tensor([0.0 if r["skip_reason"] else 1.0 for r in micro], device=device)
        batch = collate_pairs(_filler(micro), tokenizer, l.max_length, l.max_prompt_length, stats)
        batch = {k: v.to(device) for k, v in batch.items()}
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
    """Sum the counts over workers and save π_{t+1} (rank 0) as an HF folder."""
    from spo_ray.modeling import save_policy, torch_dtype

    summaries = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(summaries, asdict(summary))
    else:
        summaries = [asdict(summary)]
    state_dict = engine._zero3_consolidated_16bit_state_dict() if cfg.learner.zero_stage == 3 else None
    if rank != 0:
        return
    total = LearnerSummary()
    for s in summaries:
        for key in ("rows", "pairs", "prompts_truncated", "responses_truncated"):
            setattr(total, key, getattr(total, key) + s[key])
        for reason, count in s["skipped"].items():
            total.skipped[reason] = total.skipped.get(reason, 0) + count
    total.steps = summary.steps
    if state_dict is None:
        state_dict = engine.module.state_dict()
    dtype = torch_dtype(cfg.model.dtype)
    engine.module.config.use_cache = True
    save_policy(engine.module, tokenizer, out_dir, state_dict={k: v.to(dtype) for k, v in state_dict.items()})
    (iter_dir / "learner_summary.json").write_text(json.dumps(asdict(total), indent=2))
