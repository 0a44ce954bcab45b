"""HFEngine: batched Hugging Face `generate`, K samples per prompt (CPU or one GPU)."""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from spo_ray.modeling import load_policy, load_tokenizer
from spo_ray.rollout.base import Prompt, Rollout, SamplingConfig

log = logging.getLogger(__name__)


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


class HFEngine:
    """Samples with `model.generate`; prompts are left-padded into one batch.

    `seed` plus the batch's first prompt index make sampling reproducible per batch,
    whatever actor runs it.
    """

    def __init__(
        self,
        path: str,
        dtype: str = "float32",
        device: str | None = None,
        trust_remote_code: bool = False,
        max_prompt_tokens: int | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.max_prompt_tokens = max_prompt_tokens
        self.path = ""
        self.load_weights(path)

    def load_weights(self, path: str) -> None:
        self.model = load_policy(path, self.dtype, self.device, self.trust_remote_code).eval()
        self.tokenizer = load_tokenizer(path, self.trust_remote_code)
        self.tokenizer.padding_side = "left"
        # A prompt over max_prompt_tokens keeps its last tokens (the assistant turn's start),
        # as the learner's collate_pairs does, so both see the same prompt.
        self.tokenizer.truncation_side = "left"
        self.path = path

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> list[Rollout]:
        if not prompts:
            return []
        texts = [format_prompt(self.tokenizer, p) for p in prompts]
        enc = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
            truncation=self.max_prompt_tokens is not None,
            max_length=self.max_prompt_tokens,
        ).to(self.device)
        greedy = sampling.temperature == 0
        k = sampling.num_samples
        torch.manual_seed(sampling.seed)
        out = self.model.generate(
            **enc,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else 0,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=1 if greedy else k,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        new = out[:, enc["input_ids"].shape[1] :].cpu()
        if greedy:  # K greedy samples are one answer, repeated
            new = new.repeat_interleave(k, dim=0)
        rollouts = []
        for i in range(len(prompts)):
            responses, counts, truncated = [], [], []
            for row in new[i * k : (i + 1) * k]:
                n, hit_eos = _generated_length(row.tolist(), self.tokenizer.eos_token_id)
                responses.append(self.tokenizer.decode(row[:n], skip_special_tokens=True).strip())
                counts.append(n)
                truncated.append(not hit_eos)
            rollouts.append(Rollout(responses=responses, num_tokens=counts, truncated=truncated))
        return rollouts


def _generated_length(ids: list[int], eos_id: int) -> tuple[int, bool]:
    """Tokens up to and including the first EOS (padding after it excluded)."""
    if eos_id in ids:
        return ids.index(eos_id) + 1, True
    return len(ids), False
