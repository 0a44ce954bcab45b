"""The Engine protocol: K sampled responses per prompt from the current policy π_t."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from spo_ray.data.chat import Prompt


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled (values come from `conf/rollout/`)."""

    num_samples: int  # K responses per prompt
    temperature: float  # 0 means greedy
    top_p: float
    max_new_tokens: int
    seed: int

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be ≥ 1, got {self.num_samples}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class Rollout:
    """The K responses to one prompt, with their lengths in generated tokens (EOS included)."""

    responses: list[str]
    num_tokens: list[int]
    # True where the response hit max_new_tokens without an EOS.
    truncated: list[bool]


@runtime_checkable
class Engine(Protocol):
    """A policy that samples responses. Implementations: `hf.HFEngine`, `vllm.VLLMEngine`."""

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> list[Rollout]:
        """One `Rollout` per prompt. Prompts are user messages or conversations; the engine
        applies the tokenizer's chat template when it has one."""
        ...

    def load_weights(self, path: str) -> None:
        """Swap in the policy saved as a Hugging Face folder at `path`."""
        ...

    def shutdown(self) -> None:
        """Free the engine's memory and stop any process it started; idempotent."""
        ...
