"""The Engine protocol: K sampled responses per prompt from the current policy π_t; and
PersistentEngine, what an engine that lives for the whole run in an `EngineActor` also does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

from spo_ray.data.chat import Prompt

if TYPE_CHECKING:
    from spo_ray.rollout.weight_sync import SyncGroupSpec, WeightPlan


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


@runtime_checkable
class PersistentEngine(Engine, Protocol):
    """An Engine held by an `EngineActor` for the whole run (spo_ray/rollout/engines.py): it
    also frees its accelerator while the learner trains on it (colocated placement) and takes
    π_{t+1} from the learner's broadcast (`rollout.weight_sync: nccl`, weight_sync.py).
    Implementations: `hf.HFEngine`, `vllm.VLLMEngine`."""

    @property
    def sync_world_size(self) -> int:
        """Ranks the engine takes in a weight-sync group: one per tensor-parallel worker."""
        ...

    def sleep(self, level: int = 1) -> None:
        """Free the accelerator (level 2: the weights too); the next `load_weights` wakes it."""
        ...

    def init_weight_sync(self, spec: "SyncGroupSpec", rank_offset: int) -> None:
        """Join the sync group, its workers as ranks rank_offset, rank_offset + 1, …"""
        ...

    def receive_weights(self, plan: "WeightPlan") -> int:
        """Receive one broadcast of π_{t+1}, bucket by bucket; the number of tensors loaded."""
        ...

    def close_weight_sync(self) -> None:
        """Leave the sync group."""
        ...
