"""Row types of the stream and the only code that turns pair rows into tensors.

Rows move between stages as Ray Data batches (dicts of columns). Three shapes:
- prompt rows:  prompt_id, prompt                                  (`PROMPT_COLUMNS`)
- rollout rows: + responses, response_tokens                       (RolloutStage)
- pair rows:    the columns of `PAIR_SCHEMA` (DESIGN.md §4), named as in the SPPO
                authors' data files, plus `skip_reason` while in the stream
                ("" for a pair; else why the prompt gave none — counted, then dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import pyarrow as pa
import torch
from transformers import PreTrainedTokenizerBase

from spo_ray.data.chat import format_prompt

PROMPT_COLUMNS = ("prompt_id", "prompt")

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
STREAM_COLUMNS = PAIR_COLUMNS + ("skip_reason",)


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
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "loss_mask": loss_mask,
        "chosen_probs_win": torch.tensor([float(r["chosen_probs_win"]) for r in rows], dtype=torch.float32),
        "chosen_probs_lose": torch.tensor([float(r["chosen_probs_lose"]) for r in rows], dtype=torch.float32),
        "valid": torch.tensor(valid, dtype=torch.float32),
    }


def pair_table(rows: Sequence[dict]) -> pa.Table:
    """Pair rows as an Arrow table with `PAIR_SCHEMA` (extra stream columns dropped)."""
    return pa.Table.from_pylist([{c: r[c] for c in PAIR_COLUMNS} for r in rows], schema=PAIR_SCHEMA)
