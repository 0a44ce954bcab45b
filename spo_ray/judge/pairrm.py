"""PairRM (llm-blender/PairRM) as a native judge: same logits as llm-blender, current libraries.

PairRM (Jiang et al., 2023, "LLM-Blender", arXiv 2306.02561) is a DeBERTa-v3-large cross
encoder that reads one prompt and two responses side by side:

    [CLS] <|source|> prompt [SEP] [CLS] <|candidate1|> y_i [SEP] [CLS] <|candidate2|> y_j [SEP]

and scores each response from the last hidden states at the three prefix tokens:
M[i, j] = head([h_src; h_c1]) − head([h_src; h_c2]), head = Linear(2H, H) → tanh → Linear(H, 1).

This module reproduces llm-blender 0.0.2's `CrossCompareCollator` and
`CrossCompareReranker._full_predict` (what `Blender.rank` runs) token for token, with one
deliberate difference: llm-blender cuts every candidate of a batch to
`candidate_maxlength + (source_maxlength − Ls) // 2` tokens with Ls the longest *source in its
batch*, so its scores depend on which prompts share a batch. Here Ls is always the prompt's own
source length, which is llm-blender's batch_size=1 result (the setting of the SPPO paper's
scripts), however the work is batched. See docs/pairrm.md.

Speed comes from running the K(K−1) ordered pairs of all prompts of a call as a few
length-sorted, dynamically padded forward passes under `torch.inference_mode`, each holding at
most `token_budget` tokens (padding included).

The judge takes the prompt text exactly as given; applying the policy's chat template
(`judge.prompt_format: chat`) is the judge stage's job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from spo_ray.judge.base import scores_from_logits
from spo_ray.judge.pairrm_loading import load_pairrm
from spo_ray.judge.pairrm_model import (  # noqa: F401  (PairRMModel and the constants are public here too)
    CANDIDATE1_PREFIX,
    CANDIDATE2_PREFIX,
    CANDIDATE_PREFIX,
    DEFAULT_TOKEN_BUDGET,
    PAIRRM_CANDIDATE_MAXLENGTH,
    PAIRRM_SOURCE_MAXLENGTH,
    PREFIX_TOKENS,
    SOURCE_PREFIX,
    PairRMModel,
)


@dataclass(frozen=True)
class _Encoded:
    """One prompt, tokenized and truncated as llm-blender does at batch_size=1."""

    source: list[int]
    candidates: list[list[int]]  # each starts [CLS] <|candidate|>


class PairRMJudge:
    """The Judge protocol (`spo_ray.judge.base.Judge`) backed by a PairRM checkpoint.

    Build it with `from_pretrained`; a tokenizer passed to the constructor directly must be
    one `load_pairrm` returned, which normalizes text with the checkpoint's NFKC charsmap as
    llm-blender did (a plain transformers 5 DeBERTa-v2 tokenizer uses NFC)."""

    def __init__(
        self,
        model: PairRMModel,
        tokenizer: Any,
        *,
        source_maxlength: int = PAIRRM_SOURCE_MAXLENGTH,
        candidate_maxlength: int = PAIRRM_CANDIDATE_MAXLENGTH,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        device: str | torch.device = "cpu",
    ) -> None:
        if token_budget <= 0:
            raise ValueError(f"token_budget must be a positive number of tokens, got {token_budget}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.source_maxlength = source_maxlength
        self.candidate_maxlength = candidate_maxlength
        self.token_budget = token_budget
        self.device = torch.device(device)
        self.sep_token = tokenizer.sep_token
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = tokenizer.convert_tokens_to_ids(list(PREFIX_TOKENS))
        self.source_prefix_id, self.cand1_prefix_id, self.cand2_prefix_id, self.cand_prefix_id = ids
        vocab = model.pretrained_model.config.vocab_size
        if any(i is None or i == tokenizer.unk_token_id or i >= vocab for i in ids):
            raise ValueError(
                f"tokenizer gives prefix-token ids {dict(zip(PREFIX_TOKENS, ids))} that the checkpoint "
                f"(vocab {vocab}) cannot embed: tokenizer and weights do not belong together"
            )

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        backbone: str | os.PathLike | None = None,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
    ) -> "PairRMJudge":
        """Load `llm-blender/PairRM` (ranker layout) or `llm-blender/PairRM-hf` (hf layout).

        `name_or_path` is a local folder (no network used) or a hub id (fetched with
        `huggingface_hub.snapshot_download`, which honours HF_HUB_OFFLINE and the cache).
        `backbone` replaces the ranker config's `model_name` (microsoft/deberta-v3-large) as the
        source of the architecture config and tokenizer; for the hf layout it is only used when
        the checkpoint folder has no tokenizer. `dtype` is "float32" | "bfloat16" | "float16" or
        a torch dtype (default: float32 on CPU, bfloat16 on CUDA).
        """
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        model, tokenizer, lengths = load_pairrm(name_or_path, device=device, dtype=dtype, backbone=backbone)
        return cls(model, tokenizer, **lengths, token_budget=token_budget, device=device)

    # ----------------------------------------------------------------------------- scoring
    def pairwise_logits(self, prompt: str, responses: Sequence[str]) -> torch.Tensor:
        """[K, K] float32, M[i, j] = logit that responses[i] beats responses[j], diagonal 0."""
        return self.batch_pairwise_logits([prompt], [responses])[0]

    def batch_pairwise_logits(
        self, prompts: Sequence[str], responses: Sequence[Sequence[str]]
    ) -> list[torch.Tensor]:
        """One [K_n, K_n] matrix per prompt, equal to `pairwise_logits` per prompt."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")
        encoded = [self._encode(p, r) for p, r in zip(prompts, responses)]
        sizes = [len(e.candidates) for e in encoded]
        pairs = [(n, i, j) for n, k in enumerate(sizes) for i in range(k) for j in range(k) if i != j]
        logits = self._run_pairs(encoded, pairs)
        out = [torch.zeros(k, k) for k in sizes]
        for (n, i, j), value in zip(pairs, logits.tolist()):
            out[n][i, j] = value
        return out

    def scores(self, prompt: str, responses: Sequence[str]) -> torch.Tensor:
        """[K] PairRM scores s_i = (1/K) Σ_j (M[i, j] − M[j, i]) (llm-blender's `rank` scores)."""
        return scores_from_logits(self.pairwise_logits(prompt, responses))

    def compare(
        self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> torch.Tensor:
        """[N] M[A, B] − M[B, A]: > 0 means A wins (llm-blender's `compare(..., return_logits=True)`)."""
        if not len(prompts) == len(responses_a) == len(responses_b):
            lengths = (len(prompts), len(responses_a), len(responses_b))
            raise ValueError(f"compare needs as many prompts as responses_a and responses_b, got {lengths}")
        encoded = [self._encode(p, [a, b]) for p, a, b in zip(prompts, responses_a, responses_b)]
        pairs = [(n, i, 1 - i) for n in range(len(encoded)) for i in (0, 1)]
        logits = self._run_pairs(encoded, pairs).view(-1, 2)
        return logits[:, 0] - logits[:, 1]

    # ----------------------------------------------------------------------------- internals
    def _clean(self, text: str) -> str:
        # llm-blender turns a literal separator inside any text into a space.
        return text.replace(self.sep_token, " ") if self.sep_token else text

    def _encode(self, prompt: str, responses: Sequence[str]) -> _Encoded:
        tok = self.tokenizer
        source_text = self._clean(SOURCE_PREFIX + prompt)
        source = tok(source_text, truncation=True, max_length=self.source_maxlength)["input_ids"]
        limit = self.candidate_maxlength + (self.source_maxlength - len(source)) // 2
        texts = [self._clean(CANDIDATE_PREFIX + r) for r in responses]
        candidates = tok(texts, truncation=True, max_length=limit)["input_ids"] if texts else []
        # The head reads position 1 of each segment: the prefix token must sit there.
        for ids, prefix in [(source, self.source_prefix_id)] + [(c, self.cand_prefix_id) for c in candidates]:
            if len(ids) < 3 or ids[1] != prefix:
                raise RuntimeError(f"tokenizer did not put prefix id {prefix} second: {ids[:4]}")
        return _Encoded(source=list(source), candidates=[list(c) for c in candidates])

    def _pair_ids(self, e: _Encoded, i: int, j: int) -> tuple[list[int], tuple[int, int, int]]:
        swap = lambda ids, new: [new if t == self.cand_prefix_id else t for t in ids]  # noqa: E731
        c1 = swap(e.candidates[i], self.cand1_prefix_id)
        c2 = swap(e.candidates[j], self.cand2_prefix_id)
        ls = len(e.source)
        return e.source + c1 + c2, (1, ls + 1, ls + len(c1) + 1)

    def _run_pairs(self, encoded: Sequence[_Encoded], pairs: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """Logit per (prompt, i, j) pair, in the order given, from budgeted padded batches."""
        rows = [self._pair_ids(encoded[n], i, j) for n, i, j in pairs]
        result = torch.zeros(len(rows), dtype=torch.float32)
        # Longest first: a batch's padded width is its first row's length.
        order = sorted(range(len(rows)), key=lambda r: (-len(rows[r][0]), r))
        start = 0
        with torch.inference_mode():
            while start < len(order):
                width = len(rows[order[start]][0])
                size = max(1, min(len(order) - start, self.token_budget // width))
                batch = order[start : start + size]
                result[batch] = self._forward([rows[r] for r in batch], width).float().cpu()
                start += size
        return result

    def _forward(self, rows: Sequence[tuple[list[int], tuple[int, int, int]]], width: int) -> torch.Tensor:
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, _) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            attention_mask[r, : len(ids)] = 1
        positions = torch.tensor([p for _, p in rows], dtype=torch.long)
        return self.model(input_ids.to(self.device), attention_mask.to(self.device), positions.to(self.device))
