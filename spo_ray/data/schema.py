"""Row types of the stream and the only code that turns pair rows into tensors.

Rows move between stages as Ray Data batches (dicts of columns). Three shapes:
- prompt rows:  prompt_id, prompt                                  (`PROMPT_COLUMNS`)
- rollout rows: + responses, response_tokens, reference            (`ROLLOUT_SCHEMA`)
- pair rows:    the columns of `PAIR_SCHEMA` (DESIGN.md §4), named as in the SPPO
                authors' data files, plus `skip_reason` while in the stream
                (`STREAM_SCHEMA`: "" for a pair; else why the prompt gave none — counted,
                then dropped; `FILLER` for a weight-0 row that pads a worker's share).
`select_pairs` turns judged rollout rows into stream rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import pyarrow as pa
import torch

from spo_ray.data.chat import format_prompt
from spo_ray.sppo import select_pair

if TYPE_CHECKING:  # transformers costs ≈ 0.8 s to import: the stream's stage actors do not need it
    from transformers import PreTrainedTokenizerBase

PROMPT_COLUMNS = ("prompt_id", "prompt")
ROLLOUT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("responses", pa.list_(pa.string())),
        ("response_tokens", pa.list_(pa.int64())),
        ("reference", pa.string()),  # the prompt's reference answer; null unless the prompt has one
    ]
)
PAIR_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("responses", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float64())),
        ("win_rates", pa.list_(pa.float64())),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("chosen_probs", pa.float64()),
        ("chosen_probs_win", pa.float64()),
        ("chosen_probs_lose", pa.float64()),
        ("iteration", pa.int64()),
    ]
)
PAIR_COLUMNS = tuple(PAIR_SCHEMA.names)
STREAM_SCHEMA = PAIR_SCHEMA.append(pa.field("skip_reason", pa.string()))
STREAM_COLUMNS = tuple(STREAM_SCHEMA.names)
FILLER = "filler"  # skip_reason of a padding row: weight 0, never counted or recorded


def filler_row() -> dict:
    """A weight-0 stream row that pads a worker's share (`FILLER`): never persisted or counted."""
    return {"prompt_id": "", "prompt": "", "skip_reason": FILLER, "iteration": 0}


def select_pairs(batch: pa.Table, iteration: int) -> pa.Table:
    """Stateless map: chosen = argmax p̂, rejected = argmin p̂ (DESIGN.md §1, steps 3–4).

    Prompts without a pair keep their row with a `skip_reason` (`all_tied`, `judge_nan`,
    `too_few_responses`), so the learner can count them: rows out + skips = prompts in.
    """
    out = {name: [] for name in STREAM_COLUMNS}
    for row in batch.to_pylist():
        scores, responses = row["scores"], row["responses"]
        choice, reason = None, ""
        if len(responses) < 2:
            reason = "too_few_responses"
        elif any(not math.isfinite(s) for s in scores):
            reason = "judge_nan"
        else:
            choice = select_pair(torch.tensor(scores, dtype=torch.float64))
            reason = "" if choice is not None else "all_tied"
        out["prompt_id"].append(row["prompt_id"])
        out["prompt"].append(row["prompt"])
        out["responses"].append(responses)
        out["scores"].append(scores)
        out["iteration"].append(iteration)
        out["skip_reason"].append(reason)
        if choice is None:
            for name in ("chosen", "rejected"):
                out[name].append("")
            for name in ("chosen_probs", "chosen_probs_win", "chosen_probs_lose"):
                out[name].append(float("nan"))
            out["win_rates"].append([])
            continue
        out["win_rates"].append(list(choice.win_rates))
        out["chosen"].append(responses[choice.chosen])
        out["rejected"].append(responses[choice.rejected])
        out["chosen_probs"].append(choice.chosen_probs)
        out["chosen_probs_win"].append(choice.chosen_probs_win)
        out["chosen_probs_lose"].append(choice.chosen_probs_lose)
    return pa.Table.from_pydict(out, schema=STREAM_SCHEMA)


@dataclass
class TokenStats:
    """What tokenization had to change, for the report: truncations, and `reasons` — pairs
    that could not be tokenized at all (`tokenize_error`), trained on with weight 0."""

    prompts_truncated: int = 0
    responses_truncated: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def _encode_pair_side(
    prompt_ids: list[int], response: str, tokenizer: PreTrainedTokenizerBase, max_length: int, stats: TokenStats
) -> tuple[list[int], list[int]]:
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    if len(response_ids) > room:
        # Keep the response's start: the end is what was generated last.
        response_ids = response_ids[:room]
        stats.responses_truncated += 1
    ids = prompt_ids + response_ids
    mask = [0] * len(prompt_ids) + [1] * len(response_ids)
    return ids, mask


def _encode_row(
    row: dict, tokenizer: PreTrainedTokenizerBase, max_length: int, max_prompt_length: int, stats: TokenStats
) -> tuple[list[int], list[int], list[int], list[int]]:
    """(chosen ids, chosen mask, rejected ids, rejected mask); counts truncations into
    `stats` only once the whole row has tokenized, so a failed row counts once, as its reason."""
    row_stats = TokenStats()
    prompt_ids = tokenizer(format_prompt(tokenizer, row["prompt"]), add_special_tokens=False)["input_ids"]
    if len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
        row_stats.prompts_truncated += 1
    chosen = _encode_pair_side(prompt_ids, row["chosen"], tokenizer, max_length, row_stats)
    rejected = _encode_pair_side(prompt_ids, row["rejected"], tokenizer, max_length, row_stats)
    if not row.get("skip_reason"):  # a skipped prompt's stand-in row is not trained on: not counted
        stats.prompts_truncated += row_stats.prompts_truncated
        stats.responses_truncated += row_stats.responses_truncated
    return (*chosen, *rejected)


def collate_pairs(
    rows: Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int,
    stats: TokenStats | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize pair rows into one right-padded batch of 2B sequences.

    Rows 0..B−1 are the chosen responses, B..2B−1 the rejected ones. Each sequence is the
    policy's chat-templated prompt (its last `max_prompt_length` tokens) followed by the
    response and EOS, cut to `max_length`. `loss_mask` is 1 on response tokens incl. EOS,
    aligned with `input_ids` (as `spo_ray.sppo.sequence_logps` expects).

    A row the tokenizer fails on (e.g. a character outside a vocabulary without an unknown
    token, or text that is not a string) does not stop the run: it becomes a one-token
    stand-in with `valid` 0 — the learner gives it weight 0 — and, unless the row was
    already a counted skip, is counted as `stats.reasons["tokenize_error"]`.
    """
    encoded, valid = _encode_rows(rows, tokenizer, max_length, max_prompt_length, stats)
    seqs = [e[0] for e in encoded] + [e[2] for e in encoded]
    masks = [e[1] for e in encoded] + [e[3] for e in encoded]
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (ids, mask) in enumerate(zip(seqs, masks)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        loss_mask[i, : len(mask)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask, **_pair_targets(rows, valid)}


def collate_shared_pairs(
    rows: Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int,
    stats: TokenStats | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize pair rows as `collate_pairs` does, but one sequence per pair: the prompt
    once, then the chosen response, then the rejected one (B sequences, right-padded).

    The rejected response attends to the prompt and itself, never to the chosen response,
    and its positions restart where the prompt ends, so every token sees exactly what it
    would see in `collate_pairs`'s two sequences and the model runs over the prompt once
    instead of twice. Returns:

    - `input_ids`, `position_ids`: [B, T];
    - `attention_mask`: [B, 1, T, T] bool, True where a query may attend to a key (causal,
      rejected ↛ chosen; a padding position attends to itself only);
    - `score_positions`, `score_targets`, `score_mask`: [2B, W] — rows 0..B−1 the chosen
      responses, B..2B−1 the rejected ones: which position's logits score which token of
      sequence b = row mod B (`spo_ray.sppo.indexed_logps`); the same tokens, incl. EOS,
      that `collate_pairs`'s `loss_mask` marks;
    - `chosen_probs_win`, `chosen_probs_lose`, `valid`: as `collate_pairs`.
    """
    encoded, valid = _encode_rows(rows, tokenizer, max_length, max_prompt_length, stats)
    n = len(encoded)
    packed, segments, positions, scored = [], [], [], [[] for _ in range(2 * n)]
    for b, (chosen_ids, chosen_mask, rejected_ids, rejected_mask) in enumerate(encoded):
        p = len(chosen_mask) - sum(chosen_mask)  # prompt tokens: the mask is 0 on them, then 1
        chosen, rejected = chosen_ids[p:], rejected_ids[p:]
        packed.append(chosen_ids + rejected)
        segments.append([0] * p + [1] * len(chosen) + [2] * len(rejected))
        positions.append(list(range(p + len(chosen))) + list(range(p, p + len(rejected))))
        # Token j of a response is scored by the logits of the token before it in its own
        # sequence: the prompt's last position for j = 0 (none if the prompt is empty).
        scored[b] = [(p + j - 1, t) for j, t in enumerate(chosen) if p + j >= 1]
        rejected_at = p + len(chosen)
        scored[n + b] = [(p - 1 if j == 0 else rejected_at + j - 1, t) for j, t in enumerate(rejected) if p + j >= 1]
    width = max(len(s) for s in packed)
    input_ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)  # -1: padding
    for b, (ids, seg, pos) in enumerate(zip(packed, segments, positions)):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        segment[b, : len(seg)] = torch.tensor(seg)
        position_ids[b, : len(pos)] = torch.tensor(pos)
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_or_prompt = (key == 0) | (key == query)
    real = (query >= 0) & (key >= 0)
    diagonal = torch.eye(width, dtype=torch.bool)
    attention = (causal & same_or_prompt & real) | diagonal
    score_width = max(1, max(len(s) for s in scored))
    score_positions = torch.zeros((2 * n, score_width), dtype=torch.long)
    score_targets = torch.zeros((2 * n, score_width), dtype=torch.long)
    score_mask = torch.zeros((2 * n, score_width), dtype=torch.long)
    for s, pairs in enumerate(scored):
        if pairs:
            score_positions[s, : len(pairs)] = torch.tensor([src for src, _ in pairs])
            score_targets[s, : len(pairs)] = torch.tensor([t for _, t in pairs])
            score_mask[s, : len(pairs)] = 1
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": attention[:, None],
        "score_positions": score_positions,
        "score_targets": score_targets,
        "score_mask": score_mask,
        **_pair_targets(rows, valid),
    }


def _encode_rows(
    rows: Sequence[dict], tokenizer: PreTrainedTokenizerBase, max_length: int, max_prompt_length: int, stats: TokenStats | None
) -> tuple[list[tuple[list[int], list[int], list[int], list[int]]], list[float]]:
    """`_encode_row` for every row, with a one-token stand-in (valid 0) for a row the
    tokenizer fails on, counted as `tokenize_error` unless the row was a skip already."""
    stats = stats if stats is not None else TokenStats()
    encoded, valid = [], []
    for row in rows:
        try:
            encoded.append(_encode_row(row, tokenizer, max_length, max_prompt_length, stats))
            valid.append(1.0)
        except Exception:  # noqa: BLE001 - any tokenizer failure: this pair is skipped, counted
            stand_in = [tokenizer.eos_token_id]
            encoded.append((stand_in, [1], stand_in, [1]))
            valid.append(0.0)
            if not row.get("skip_reason"):
                stats.reasons["tokenize_error"] = stats.reasons.get("tokenize_error", 0) + 1
    return encoded, valid


def _pair_targets(rows: Sequence[dict], valid: list[float]) -> dict[str, torch.Tensor]:
    return {
        "chosen_probs_win": torch.tensor([float(r["chosen_probs_win"]) for r in rows], dtype=torch.float32),
        "chosen_probs_lose": torch.tensor([float(r["chosen_probs_lose"]) for r in rows], dtype=torch.float32),
        "valid": torch.tensor(valid, dtype=torch.float32),
    }


def pair_table(rows: Sequence[dict]) -> pa.Table:
    """Pair rows as an Arrow table with `PAIR_SCHEMA` (extra stream columns dropped)."""
    return pa.Table.from_pylist([{c: r[c] for c in PAIR_COLUMNS} for r in rows], schema=PAIR_SCHEMA)
