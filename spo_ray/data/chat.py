"""Chat formatting: the text a policy continues, and the prompt text a judge sees.

Everyone who turns a prompt into model input uses these: the rollout engines (HF, vLLM),
the judge stage, evaluation, Serve, and the learner's tokenization (`data/schema.py`), so
the policy is trained on exactly the text it was sampled from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Union

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# A prompt: one user message, or a whole conversation (role/content dicts) ending in a user turn.
Prompt = Union[str, Sequence[dict]]


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    """The text the policy continues: the chat template up to the assistant turn, when the
    tokenizer has one; otherwise a single user message as is, a conversation as
    `role: content` lines."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def judge_prompts(prompts: Sequence[str], prompt_format: str, tokenizer: PreTrainedTokenizerBase | None = None) -> list[str]:
    """The prompt text the judge sees: `chat` — as the policy saw it (its chat template up
    to the assistant turn, as the paper's ranking script does); `raw` — the user text."""
    if prompt_format == "chat" and tokenizer is not None:
        return [format_prompt(tokenizer, p) for p in prompts]
    return list(prompts)
