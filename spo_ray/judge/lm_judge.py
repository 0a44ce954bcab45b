"""LM-as-judge: a causal LM reads the prompt and two responses and answers "A" or "B".

For an ordered pair (a, b) the judge model sees `template` with y_a as Response A and y_b
as Response B, rendered as a user turn of its chat template, and we read the next-token
logits of the two answer letters: D[a, b] = ℓ_A − ℓ_B, the log-odds that A (= y_a) is the
better response. Judge models prefer one position whatever the content, so both orders
are averaged:

    M[i, j] = ½ (D[i, j] − D[j, i])

which cancels a constant position bias and makes M antisymmetric (M[i, i] = 0). One
prompt with K responses costs K(K−1) forward passes, batched. Each letter's logit is the
logsumexp over its single-token spellings ("A" and " A", where they exist).

This needs a capable judge model (a 7B+ instruct model on a GPU). Small models are at
chance: SmolLM2-135M-Instruct agrees with clear-cut pairs about as often as a coin (see
docs/judges.md), so the demo uses `ReferenceJudge` instead.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch

from spo_ray.dtypes import torch_dtype

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = (
    "Which of the two responses below answers the user's question better? Judge how "
    "helpful, correct and relevant each one is.\n\n"
    "[Question]\n{prompt}\n\n"
    "[Response A]\n{response_a}\n\n"
    "[Response B]\n{response_b}\n\n"
    "Reply with a single letter: A if Response A is better, B if Response B is better."
)


def answer_token_ids(tokenizer, letter: str) -> list[int]:
    """Token ids that spell `letter` as one token: "A" and/or " A"."""
    ids = []
    for spelling in (letter, " " + letter):
        encoded = tokenizer.encode(spelling, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    if not ids:
        raise ValueError(f"the judge's tokenizer has no single token for the answer {letter!r}")
    return ids


class LMJudge:
    """Judge protocol over a causal LM's preference between two answers, both orders."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        template: str = DEFAULT_TEMPLATE,
        batch_size: int = 8,
        max_response_tokens: int = 512,
    ) -> None:
        for field in ("{prompt}", "{response_a}", "{response_b}"):
            if field not in template:
                raise ValueError(f"the LM judge template must contain {field}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.batch_size = batch_size
        self.max_response_tokens = max_response_tokens
        self.a_ids = answer_token_ids(tokenizer, "A")
        self.b_ids = answer_token_ids(tokenizer, "B")
        if set(self.a_ids) & set(self.b_ids):
            raise ValueError("the answer tokens for 'A' and 'B' overlap in the judge's tokenizer")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | os.PathLike,
        device: str = "cpu",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        **kwargs,
    ) -> "LMJudge":
        """Load any Hugging Face causal LM (folder or hub id) as a frozen judge."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch_dtype(dtype)  # an unknown name raises before the tokenizer loads
        path = str(path_or_name)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
        ).to(device)
        model.requires_grad_(False)
        logger.info("LM judge: %s on %s (%s)", path, device, dtype)
        return cls(model, tokenizer, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _truncate(self, text: str) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= self.max_response_tokens:
            return text
        return self.tokenizer.decode(ids[: self.max_response_tokens])

    def judge_text(self, prompt: str, response_a: str, response_b: str) -> str:
        """The full text the judge model reads before its one-letter answer."""
        question = self.template.format(
            prompt=prompt, response_a=self._truncate(response_a), response_b=self._truncate(response_b)
        )
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        return question + "\nAnswer:"

    @torch.no_grad()
    def answer_log_odds(self, texts: Sequence[str]) -> torch.Tensor:
        """ℓ_A − ℓ_B at the next token after each text, as a float32 [N] tensor."""
        out = torch.empty(len(texts))
        for start in range(0, len(texts), self.batch_size):
            encoded = [
                self.tokenizer.encode(t, add_special_tokens=False) for t in texts[start : start + self.batch_size]
            ]
            lengths = torch.tensor([len(ids) for ids in encoded])
            # Right padding: the causal mask keeps pads out of every real position, so no
            # position ids are needed and any causal LM works.
            input_ids = torch.full((len(encoded), int(lengths.max())), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, ids in enumerate(encoded):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            ).logits
            last = logits[torch.arange(len(encoded)), (lengths - 1).to(self.device)].float()
            log_odds = last[:, self.a_ids].logsumexp(-1) - last[:, self.b_ids].logsumexp(-1)
            out[start : start + len(encoded)] = log_odds.cpu()
        return out

    def pairwise_logits(self, prompt: str, responses: Sequence[str]) -> torch.Tensor:
        return self.batch_pairwise_logits([prompt], [responses])[0]

    def batch_pairwise_logits(
        self, prompts: Sequence[str], responses: Sequence[Sequence[str]]
    ) -> list[torch.Tensor]:
        """All ordered pairs of all prompts go through the judge model in shared batches."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")
        pairs = [
            (n, a, b)
            for n, rs in enumerate(responses)
            for a in range(len(rs))
            for b in range(len(rs))
            if a != b
        ]
        texts = [self.judge_text(prompts[n], responses[n][a], responses[n][b]) for n, a, b in pairs]
        log_odds = self.answer_log_odds(texts) if texts else torch.empty(0)
        first_order = [torch.zeros(len(rs), len(rs)) for rs in responses]  # D[a, b]
        for (n, a, b), value in zip(pairs, log_odds):
            first_order[n][a, b] = value
        return [(d - d.T) / 2 for d in first_order]
