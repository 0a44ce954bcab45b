"""One learner step, without Ray: collate → policy and reference log-probs → loss →
backward, then the optimizer step.

The Ray Train loop (spo_ray/learner/loop.py) calls `learner_step` once per optimizer step
on the rows its shard delivered; benchmarks and tests call it directly, on a DeepSpeed
engine in a one-process group (`spo_ray.learner.models.single_process_group`) or on a
`TorchEngine` (a plain torch optimizer, for a bare machine without DeepSpeed).

Loss normalization: each micro-batch contributes Σ_pairs weight · loss / micro_batch_size;
the engine divides by the accumulation steps (and DeepSpeed averages over workers), so an
optimizer step applies Σ loss / global_batch_size — a short final step counts its pairs
with the same weight as any other.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field, fields
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, TypeVar

import torch

from spo_ray.data.schema import TokenStats, collate_pairs, collate_shared_pairs
from spo_ray.sppo import indexed_logps, preference_loss, sequence_logps

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StepSettings(Protocol):
    """The learner settings a step reads; `spo_ray.config.LearnerConfig` has them (a
    Protocol, so a machine without Hydra can pass its own)."""

    loss: str
    beta: float
    micro_batch_size: int
    max_length: int
    max_prompt_length: int
    shared_prompt: bool


class TrainEngine(Protocol):
    """What a step needs of the policy's training engine. DeepSpeed's `DeepSpeedEngine`
    has all of it; `TorchEngine` is the same over a plain torch optimizer."""

    module: torch.nn.Module
    device: torch.device

    def __call__(self, **inputs: torch.Tensor) -> Any: ...

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None: ...

    def backward(self, loss: torch.Tensor) -> Any: ...

    def step(self) -> None: ...

    def get_global_grad_norm(self) -> float | None: ...


@dataclass
class LearnerModels:
    """What a step trains with: the policy's engine (training mode), the frozen reference
    π_t (eval mode), the tokenizer and the LR schedule (inside the engine; for the log)."""

    tokenizer: Any
    engine: TrainEngine
    reference: torch.nn.Module
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    _shares_prompt: bool | None = field(default=None, init=False, repr=False)

    def shares_prompt(self, cfg: StepSettings) -> bool:
        """Whether micro-batches run as `collate_shared_pairs` batches: `learner.shared_prompt`
        and both models able to (`shared_prompt_refusal`; else a warning, once, and two
        sequences per pair)."""
        if not cfg.shared_prompt:
            return False
        if self._shares_prompt is None:
            reason = shared_prompt_refusal(self.engine.module, cfg.max_length) or shared_prompt_refusal(self.reference, cfg.max_length)
            if reason:
                logger.warning("learner.shared_prompt: %s; each pair runs as two sequences", reason)
            self._shares_prompt = reason is None
        return self._shares_prompt


@dataclass
class StepSums:
    """One optimizer step's sums over its weighted pairs (weight 0: skipped or filler
    rows), for the log. `grad_norm` is no sum: the engine's global gradient norm."""

    loss: float = 0.0
    chosen_logratio: float = 0.0  # Σ a, a = log π_θ/π_t on chosen
    rejected_logratio: float = 0.0  # Σ b, on rejected
    pairs: float = 0.0  # Σ weights
    rows: int = 0  # rows seen, fillers included
    grad_norm: float | None = None

    def __iadd__(self, other: StepSums) -> StepSums:
        for f in fields(self)[:5]:
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items; the last one may be shorter."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def step_groups(rows: Iterable[dict], micro_batch_size: int, accumulation_steps: int) -> Iterator[list[list[dict]]]:
    """Rows as optimizer steps: each a list of up to `accumulation_steps` micro-batches of
    up to `micro_batch_size` rows (only the last step and its last micro-batch run short)."""
    return chunked(chunked(rows, micro_batch_size), accumulation_steps)


def with_stand_ins(rows: Sequence[dict]) -> list[dict]:
    """Skipped rows and fillers keep their slot with a stand-in pair (weight 0 in the loss)."""
    stand_in = {"chosen": "", "rejected": "", "chosen_probs_win": 0.5, "chosen_probs_lose": 0.5}
    return [r if not r["skip_reason"] else {**r, **stand_in} for r in rows]


def response_logps(model: Callable[..., Any], module: torch.nn.Module, batch: dict, full_logits: bool = False) -> torch.Tensor:
    """Σ log π over each sequence's response tokens (`spo_ray.sppo.sequence_logps`), [2B].

    The LM head and the log-softmax over the vocabulary run only on the positions that
    score a response token of some sequence — from the shortest prompt's end to the
    longest response's end — not on the prompt before them (about half of the tokens), as
    transformers' `logits_to_keep` allows. `full_logits`, or a model without that argument:
    every position. `model` is what to call (a DeepSpeed engine, say), `module` the model
    it runs.
    """
    ids, mask = batch["input_ids"], batch["loss_mask"]
    inputs = {"input_ids": ids, "attention_mask": batch["attention_mask"]}
    scored = mask[:, 1:].any(dim=0).nonzero()  # logits at t score the token at t + 1
    if full_logits or not len(scored) or "logits_to_keep" not in inspect.signature(module.forward).parameters:
        return sequence_logps(model(**inputs).logits, ids, mask)
    start, end = scored[0].item(), scored[-1].item() + 2
    logits = model(**inputs, logits_to_keep=torch.arange(start, end, device=ids.device)).logits
    # The band's first position scores nothing of its own (its mask is unread), the last is unused.
    return sequence_logps(logits, ids[:, start:end], mask[:, start:end])


def shared_prompt_refusal(module: torch.nn.Module, max_length: int) -> str | None:
    """Why `module` cannot run `collate_shared_pairs` batches (None: it can).

    They need a custom 4D attention mask, which transformers hands as it is to its `sdpa`
    and `eager` attention (not to flash attention's), and position ids. The mask sets no
    sliding window: a window shorter than a sequence (`max_length`) would act in two
    sequences per pair and not in one.
    """
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} takes no custom 4D mask (sdpa and eager do)"
    if "position_ids" not in inspect.signature(module.forward).parameters:
        return f"{type(module).__name__}.forward takes no position_ids"
    window = getattr(module.config, "sliding_window", None)
    if isinstance(window, int) and window < max_length:
        return f"its sliding window ({window} tokens) is shorter than learner.max_length ({max_length})"
    return None


def shared_response_logps(model: Callable[..., Any], module: torch.nn.Module, batch: dict, full_logits: bool = False) -> torch.Tensor:
    """`response_logps` of a `collate_shared_pairs` batch: one forward per pair, the prompt
    once; [2B], chosen then rejected. The LM head runs on the band of positions that score
    some response token (`logits_to_keep`), or everywhere with `full_logits`."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if getattr(module.config, "_attn_implementation", None) == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=module.dtype, device=ids.device).masked_fill(~mask, torch.finfo(module.dtype).min)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": batch["position_ids"]}
    sources, keep = batch["score_positions"], batch["score_mask"]
    rows = torch.arange(sources.shape[0], device=ids.device) % ids.shape[0]
    scored = sources[keep.bool()]
    if full_logits or not len(scored) or "logits_to_keep" not in inspect.signature(module.forward).parameters:
        return indexed_logps(model(**inputs).logits, rows, sources, batch["score_targets"], keep)
    start, end = scored.min().item(), scored.max().item() + 1
    logits = model(**inputs, logits_to_keep=torch.arange(start, end, device=ids.device)).logits
    return indexed_logps(logits, rows, (sources - start).clamp(min=0), batch["score_targets"], keep)


def micro_batch_loss(
    models: LearnerModels,
    rows: Sequence[dict],
    cfg: StepSettings,
    stats: TokenStats | None = None,
    full_logits: bool = False,
) -> tuple[torch.Tensor, StepSums]:
    """The loss of one micro-batch of pair rows (to back-propagate) and its sums.

    Rows with a `skip_reason`, and pairs the tokenizer fails on, take part with weight 0.
    `full_logits`: the LM head on every position (see `response_logps`; for comparisons).
    """
    engine, device = models.engine, models.engine.device
    weight = torch.tensor([0.0 if r["skip_reason"] else 1.0 for r in rows], device=device)
    shared = models.shares_prompt(cfg)
    collate, logps_of = (collate_shared_pairs, shared_response_logps) if shared else (collate_pairs, response_logps)
    batch = collate(with_stand_ins(rows), models.tokenizer, cfg.max_length, cfg.max_prompt_length, stats)
    batch = {k: v.to(device) for k, v in batch.items()}
    weight = weight * batch["valid"]
    logps = logps_of(engine, engine.module, batch, full_logits)
    with torch.no_grad():  # π_t is frozen
        ref_logps = logps_of(models.reference, models.reference, batch, full_logits)
    n = len(rows)  # rows 0..n−1 chosen, n..2n−1 rejected (either collate)
    per_pair = preference_loss(
        logps[:n], logps[n:], ref_logps[:n], ref_logps[n:],
        loss_type=cfg.loss, beta=cfg.beta,
        chosen_probs_win=batch["chosen_probs_win"], chosen_probs_lose=batch["chosen_probs_lose"],
    )
    a = (logps[:n] - ref_logps[:n]).detach()
    b = (logps[n:] - ref_logps[n:]).detach()
    sums = StepSums(
        loss=(per_pair.detach() * weight).sum().item(),
        chosen_logratio=(a * weight).sum().item(),
        rejected_logratio=(b * weight).sum().item(),
        pairs=weight.sum().item(),
        rows=n,
    )
    return (per_pair * weight).sum() / cfg.micro_batch_size, sums


def accumulate_gradients(
    models: LearnerModels,
    group: Sequence[Sequence[dict]],
    cfg: StepSettings,
    stats: TokenStats | None = None,
    full_logits: bool = False,
) -> StepSums:
    """Forward and backward of one optimizer step's micro-batches; the engine accumulates
    their gradients. `stats` counts truncations and untokenizable pairs."""
    sums = StepSums()
    for i, rows in enumerate(group):
        models.engine.set_gradient_accumulation_boundary(i == len(group) - 1)
        loss, micro = micro_batch_loss(models, rows, cfg, stats, full_logits)
        models.engine.backward(loss)
        sums += micro
    return sums


def learner_step(
    models: LearnerModels,
    group: Sequence[Sequence[dict]],
    cfg: StepSettings,
    stats: TokenStats | None = None,
    full_logits: bool = False,
) -> StepSums:
    """One optimizer step on `group` (micro-batches of pair rows, see `step_groups`)."""
    sums = accumulate_gradients(models, group, cfg, stats, full_logits)
    engine = models.engine
    # DeepSpeed reports the norm it clipped with, except without ZeRO in fp32 (it clips the
    # parameters' own gradients, which ZeRO would have moved into its partitions): then ours.
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    own_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else None
    engine.step()
    reported = engine.get_global_grad_norm()
    sums.grad_norm = float(reported) if reported is not None else own_norm
    return sums


class TorchEngine:
    """`TrainEngine` over a plain torch optimizer: gradient accumulation, clipping and the
    LR schedule as DeepSpeed does them, and optional autocast (e.g. bf16 on a GPU). For
    machines without DeepSpeed (benchmarks/gpu_components.py) and for tests."""

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        accumulation_steps: int = 1,
        grad_clip: float = 0.0,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.accumulation_steps, self.grad_clip, self.autocast_dtype = accumulation_steps, grad_clip, autocast_dtype
        self.device = next(module.parameters()).device
        self._grad_norm: float | None = None

    def __call__(self, **inputs: torch.Tensor) -> Any:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            return self.module(**inputs)

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        pass  # step() is called at the boundary

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation_steps).backward()

    def step(self) -> None:
        if self.grad_clip > 0:  # the norm is known only where it is computed for clipping
            self._grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm
