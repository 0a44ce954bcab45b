"""Answers from an HF policy: the chat prompt, n sampled or greedy completions, and the
engine a replica (or spot_check) loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from spo_ray.data.chat import format_prompt


class PromptError(ValueError):
    """The messages cannot be turned into a prompt for this model (answered as a 400)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Completion:
    texts: list[str]
    finish_reasons: list[str]  # "stop" (EOS) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int  # over all n texts, EOS included


def render_messages(tokenizer: Any, messages: Sequence[dict]) -> str:
    """The text the policy continues: the chat template of the whole conversation up to
    the assistant turn; without a template, a single user message as is or `role: content`
    lines (`data.chat.format_prompt`)."""
    try:
        return format_prompt(tokenizer, messages)
    except Exception as err:  # jinja raises for conversations a template rejects
        raise PromptError(f"the model's chat template rejects these messages: {err}") from None


@torch.inference_mode()
def complete_chat(
    model: Any,
    tokenizer: Any,
    messages: Sequence[dict],
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    n: int,
    seed: int,
) -> Completion:
    """n answers to a conversation from an HF causal LM (temperature 0: greedy).

    Seeds torch's global generator: callers that generate concurrently must serialize.
    """
    text = render_messages(tokenizer, messages)
    enc = tokenizer([text], return_tensors="pt", add_special_tokens=False).to(model.device)
    prompt_tokens = enc["input_ids"].shape[1]
    context = getattr(model.config, "max_position_embeddings", None)
    if context and prompt_tokens + max_tokens > context:
        raise PromptError(
            f"this model's maximum context length is {context} tokens; the messages take "
            f"{prompt_tokens} and max_tokens asks for {max_tokens}: shorten them or lower max_tokens",
            code="context_length_exceeded",
        )
    greedy = temperature == 0
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=enc["input_ids"].repeat(n, 1),  # n rows rather than num_return_sequences: greedy allows that too
        attention_mask=enc["attention_mask"].repeat(n, 1),
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        top_k=None if greedy else 0,
        max_new_tokens=max_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts, reasons, total = [], [], 0
    for row in out[:, prompt_tokens:].cpu().tolist():
        stop = tokenizer.eos_token_id in row
        length = row.index(tokenizer.eos_token_id) + 1 if stop else len(row)
        texts.append(tokenizer.decode(row[:length], skip_special_tokens=True).strip())
        reasons.append("stop" if stop else "length")
        total += length
    return Completion(texts, reasons, prompt_tokens, total)


def load_engine(checkpoint: str, dtype: str) -> Any:
    from spo_ray.rollout.hf import HFEngine

    if not Path(checkpoint, "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint!r} is not a Hugging Face checkpoint folder (no config.json)")
    return HFEngine(checkpoint, dtype=dtype)
