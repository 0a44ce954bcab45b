"""The SPPO math: sequence log-probs, win probabilities, pair selection and losses.

Self-Play Preference Optimization (Wu et al., 2024, arXiv 2405.00675), Algorithm 1.
One iteration turns π_t into π_{t+1}. For a prompt x with K responses y_1..y_K ~ π_t:

    P[i, j] = σ(s_i − s_j)                       pairwise win probability (P[i, i] = ½)
    p̂_i    = (1/K) Σ_j P[i, j]                   estimated P(y_i ≻ π_t | x), diagonal included
    w = argmax_i p̂_i,  l = argmin_i p̂_i          chosen and rejected response

and the SPPO objective, with the frozen reference π_t and η = 1/β,

    θ_{t+1} = argmin_θ E[ ( log π_θ(y|x)/π_t(y|x) − η (p̂(y) − ½) )² ],

is the square loss that makes log π_θ/π_t approach the exact multiplicative-weights
update π_{t+1}(y|x) ∝ π_t(y|x) exp(η P(y ≻ π_t|x)), with the log-partition function
approximated by η/2 (because P(π_t ≻ π_t) = ½).

Everything here is pure torch: no Ray, DeepSpeed, vLLM or I/O, so it runs and is tested
on CPU. The Ray stages and the learner call these functions; they do not re-implement them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "LOSS_TYPES",
    "PairChoice",
    "indexed_logps",
    "preference_loss",
    "select_pair",
    "sequence_logps",
    "win_probabilities",
]


# ---------------------------------------------------------------------------
# Sequence log-probabilities
# ---------------------------------------------------------------------------


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Σ_{t : mask_t = 1} log π(labels_t | labels_<t), one float32 value per sequence.

    Args:
        logits: [B, T, V] causal-LM logits for the input ids (any float dtype, e.g. bf16).
        labels: [B, T] the input ids themselves (not shifted). Positions with mask 0 may
            hold anything, including -100 or padding ids; they are never indexed.
        loss_mask: [B, T], 1 on response tokens (including EOS), 0 on prompt and padding.

    Returns:
        [B] float32 tensor. The token at position t is scored by the logits at position
        t − 1, so position 0 is never scored (even if its mask is 1) and the logits at
        the last position are never used.

    The log-softmax is computed in float32 one sequence at a time, as
    logit[label] − logsumexp(logits): the full [B, T, V] float32 log-softmax is never
    materialized, only one [T, V] float32 row at a time (a no-op cast for fp32 input).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2] or loss_mask.shape != logits.shape[:2]:
        raise ValueError(
            "labels and loss_mask must be [B, T] matching logits [B, T, V]; got "
            f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, "
            f"loss_mask {tuple(loss_mask.shape)}"
        )
    # Shift: logits at t − 1 predict the token at t.
    scoring_logits = logits[:, :-1, :]
    mask = loss_mask[:, 1:].bool()
    # Masked labels may be -100 or out of range; point them at id 0 so gather is safe.
    targets = torch.where(mask, labels[:, 1:], torch.zeros_like(labels[:, 1:])).long()

    per_sequence = []
    for row_logits, row_targets, row_mask in zip(scoring_logits, targets, mask):
        row = row_logits.float()  # [T − 1, V]
        picked = row.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)
        token_logps = picked - torch.logsumexp(row, dim=-1)
        # where, not multiply: an unscored position with -inf logits must not give NaN.
        per_sequence.append(torch.where(row_mask, token_logps, 0.0).sum())
    if not per_sequence:  # B == 0
        return logits.new_zeros(0, dtype=torch.float32)
    return torch.stack(per_sequence)


def indexed_logps(
    logits: torch.Tensor,
    rows: torch.Tensor,
    sources: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Σ_w mask[s, w] · log softmax(logits[rows[s], sources[s, w]])[targets[s, w]], per s.

    `sequence_logps` for sequences that do not lie one token after another in a row of
    logits: several scored sequences may read one row (a prompt shared by the chosen and
    the rejected response, spo_ray.data.schema.collate_shared_pairs), and one position may
    score a token of each (the prompt's last position predicts both responses' first token).

    Args:
        logits: [B, L, V] causal-LM logits (any float dtype).
        rows: [S] the logits row each scored sequence reads.
        sources: [S, W] the position in that row whose logits score token w.
        targets: [S, W] the token ids scored.
        mask: [S, W] 1 where (sources, targets) is a token to count; elsewhere the entries
            are never read for the sum (they must still index inside logits).

    Returns:
        [S] float32. The log-softmax is computed in float32, one scored sequence at a time.
    """
    if logits.dim() != 3 or sources.shape != targets.shape or sources.shape != mask.shape:
        raise ValueError(
            f"logits must be [B, L, V] and sources, targets, mask one [S, W] shape; got logits "
            f"{tuple(logits.shape)}, sources {tuple(sources.shape)}, targets {tuple(targets.shape)}, mask {tuple(mask.shape)}"
        )
    per_sequence = []
    for row, source, target, keep in zip(rows.tolist(), sources, targets, mask.bool()):
        picked = logits[row, source].float()  # [W, V]
        token_logps = picked.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(picked, dim=-1)
        per_sequence.append(torch.where(keep, token_logps, 0.0).sum())
    if not per_sequence:
        return logits.new_zeros(0, dtype=torch.float32)
    return torch.stack(per_sequence)


# ---------------------------------------------------------------------------
# Win probabilities and pair selection
# ---------------------------------------------------------------------------


def win_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """P[..., i, j] = σ(s_i − s_j), the probability that response i beats response j.

    Args:
        scores: [..., K] per-response scores (e.g. PairRM's s_i); leading dims are batch.

    Returns:
        [..., K, K] in the dtype of `scores` (integer scores are promoted to float32).
        P[i, i] = ½ and P + Pᵀ = 1.
    """
    scores = torch.as_tensor(scores)
    if not scores.is_floating_point():
        scores = scores.float()
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension [..., K], got a scalar")
    return torch.sigmoid(scores.unsqueeze(-1) - scores.unsqueeze(-2))


@dataclass(frozen=True)
class PairChoice:
    """The chosen/rejected pair of one prompt and the probabilities the losses need.

    Field names follow the official SPPO data files (and the pair rows in DESIGN §4).
    """

    chosen: int
    """w = first index of max_i p̂_i."""
    rejected: int
    """l = first index of min_i p̂_i."""
    chosen_probs: float
    """P[w, l] = σ(s_w − s_l)."""
    chosen_probs_win: float
    """p̂_w, the estimated win rate of the chosen response against π_t."""
    chosen_probs_lose: float
    """p̂_l, the estimated win rate of the rejected response against π_t."""
    win_rates: list[float] = field(default_factory=list, hash=False)
    """p̂_i for every response i, in response order."""


def select_pair(scores: Sequence[float] | torch.Tensor) -> PairChoice | None:
    """Pick the SPPO pair from the K scores of one prompt (Algorithm 1, data step).

    p̂_i = (1/K) Σ_j σ(s_i − s_j), diagonal ½ included (as in the paper's code), so
    Σ_i p̂_i = K/2. chosen = first argmax of p̂, rejected = first argmin of p̂.

    Computed in float64. Returns None when every p̂_i is exactly equal (float64 ``==``,
    no tolerance): then there is no preference to learn and the caller counts the
    prompt as skipped. Because p̂ is strictly increasing in s, that happens exactly
    when all scores are equal, or differ by less than float64 can resolve in σ.

    Raises:
        ValueError: scores is not 1-D, has fewer than 2 entries, or holds NaN/inf.
    """
    if isinstance(scores, torch.Tensor):
        s = scores.detach().to(device="cpu", dtype=torch.float64)
    else:
        s = torch.tensor(list(scores), dtype=torch.float64)
    if s.dim() != 1:
        raise ValueError(f"scores must be 1-D [K], got shape {tuple(s.shape)}")
    if s.numel() < 2:
        raise ValueError(f"select_pair needs K >= 2 scores to form a pair, got K={s.numel()}")
    values = s.tolist()
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise ValueError(
                f"scores[{index}] = {value} is not finite (scores={values}); "
                "fix the judge output or drop this prompt"
            )

    probs = win_probabilities(s)
    win_rates = probs.mean(dim=-1).tolist()
    best, worst = max(win_rates), min(win_rates)
    if best == worst:
        return None
    chosen = win_rates.index(best)
    rejected = win_rates.index(worst)
    return PairChoice(
        chosen=chosen,
        rejected=rejected,
        chosen_probs=probs[chosen, rejected].item(),
        chosen_probs_win=best,
        chosen_probs_lose=worst,
        win_rates=win_rates,
    )


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------

# A loss takes a = log π_θ(y_w|x) − log π_ref(y_w|x), b = the same for y_l, β and the
# win rates (p̂_w, p̂_l; None when not given) and returns the per-example loss [B].
LossFn = Callable[
    [torch.Tensor, torch.Tensor, float, torch.Tensor | None, torch.Tensor | None],
    torch.Tensor,
]

_LOSSES: dict[str, LossFn] = {}


def _register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Add a loss to the registry under `name`; a name can be registered only once."""

    def register(fn: LossFn) -> LossFn:
        if name in _LOSSES:
            raise ValueError(f"loss_type {name!r} is already registered ({_LOSSES[name]})")
        _LOSSES[name] = fn
        return fn

    return register


@_register_loss("sppo")
def _sppo_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    beta: float,
    win: torch.Tensor | None,
    lose: torch.Tensor | None,
) -> torch.Tensor:
    """½[(a − η(p̂_w − ½))² + (b − η(p̂_l − ½))²], η = 1/β.

    The SPPO objective applied to both responses of the pair, as in the paper authors'
    trainer."""
    if win is None or lose is None:
        raise ValueError(
            "loss_type='sppo' needs chosen_probs_win (p̂_w) and chosen_probs_lose (p̂_l), "
            "e.g. from select_pair(); use loss_type='sppo_hard' to train without them"
        )
    eta = 1.0 / beta
    return 0.5 * ((a - eta * (win - 0.5)) ** 2 + (b - eta * (lose - 0.5)) ** 2)


@_register_loss("sppo_hard")
def _sppo_hard_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    beta: float,
    win: torch.Tensor | None,
    lose: torch.Tensor | None,
) -> torch.Tensor:
    """(a − η/2)² + (b + η/2)²: TRL's `sppo_hard`, i.e. 2 × the sppo loss with p̂_w = 1,
    p̂_l = 0. The win rates are ignored."""
    eta = 1.0 / beta
    return (a - 0.5 * eta) ** 2 + (b + 0.5 * eta) ** 2


@_register_loss("dpo")
def _dpo_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    beta: float,
    win: torch.Tensor | None,
    lose: torch.Tensor | None,
) -> torch.Tensor:
    """−log σ(β(a − b)) (Rafailov et al., 2023), via logsigmoid so that large margins of
    either sign stay finite. The win rates are ignored."""
    return -F.logsigmoid(beta * (a - b))


@_register_loss("ipo")
def _ipo_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    beta: float,
    win: torch.Tensor | None,
    lose: torch.Tensor | None,
) -> torch.Tensor:
    """((a − b) − 1/(2β))² (Azar et al., 2023) on summed log-probs, as in the SPPO
    authors' code. TRL's `ipo` instead divides each log-prob by its token count first,
    so its β is not interchangeable with this one. The win rates are ignored."""
    return ((a - b) - 1.0 / (2.0 * beta)) ** 2


LOSS_TYPES: tuple[str, ...] = tuple(_LOSSES)
"""The registered loss names, for config validation."""


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    loss_type: str,
    beta: float,
    chosen_probs_win: torch.Tensor | float | None = None,
    chosen_probs_lose: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Per-example preference loss [B] (not reduced), chosen from `LOSS_TYPES` by name.

    With a = log π_θ(y_w|x) − log π_ref(y_w|x), b = log π_θ(y_l|x) − log π_ref(y_l|x)
    (summed over response tokens, see `sequence_logps`) and η = 1/β:

        sppo:       ½[(a − η(p̂_w − ½))² + (b − η(p̂_l − ½))²]    (SPPO objective)
        sppo_hard:  (a − η/2)² + (b + η/2)²            (TRL's; 2 × sppo at p̂_w=1, p̂_l=0)
        dpo:        −log σ(β(a − b))
        ipo:        ((a − b) − 1/(2β))²                (summed, not mean, log-probs)

    The reference log-probs and the win rates are detached: π_ref is frozen, so the
    gradient reaches the policy log-probs only. Computed in at least float32.
    `chosen_probs_win`/`chosen_probs_lose` are required by `sppo` and ignored by the others.

    Raises:
        ValueError: unknown loss_type (the message lists the known ones), β not a
            positive finite number, mismatched shapes, or `sppo` without win rates.
    """
    if loss_type not in _LOSSES:
        raise ValueError(
            f"unknown loss_type {loss_type!r}; known loss types: {', '.join(LOSS_TYPES)}"
        )
    try:
        beta_value = float(beta)
    except (TypeError, ValueError):
        beta_value = math.nan
    if not (math.isfinite(beta_value) and beta_value > 0):
        raise ValueError(f"beta must be a positive finite number (η = 1/β), got {beta!r}")
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    shapes = [tuple(t.shape) for t in logps]
    if len(set(shapes)) != 1:
        raise ValueError(
            "policy_chosen, policy_rejected, ref_chosen and ref_rejected log-probs must "
            f"have the same shape, got {shapes}"
        )
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    device = policy_chosen_logps.device

    def prepare(x: torch.Tensor | float | None) -> torch.Tensor | None:
        if x is None:
            return None
        return torch.as_tensor(x).detach().to(device=device, dtype=dtype)

    a = policy_chosen_logps.to(dtype) - ref_chosen_logps.detach().to(dtype)
    b = policy_rejected_logps.to(dtype) - ref_rejected_logps.detach().to(dtype)
    return _LOSSES[loss_type](
        a, b, beta_value, prepare(chosen_probs_win), prepare(chosen_probs_lose)
    )
