"""The rollout engine a config names (as `spo_ray.judge.build_judge` builds its judge)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spo_ray.config import engine_dtype

if TYPE_CHECKING:
    from spo_ray.config import Config
    from spo_ray.rollout.base import Engine


def make_engine(cfg: Config, policy_path: str, device: str | None = None) -> Engine:
    """The rollout engine named by `rollout.engine`, holding the policy at `policy_path`."""
    if cfg.rollout.engine == "vllm":
        from spo_ray.rollout.vllm import VLLMEngine  # optional extra: `pip install spo_ray[vllm]`

        return VLLMEngine.from_config(cfg, policy_path)
    from spo_ray.rollout.hf import HFEngine

    return HFEngine(
        policy_path,
        dtype=engine_dtype(cfg),
        device=device,
        trust_remote_code=cfg.model.trust_remote_code,
        max_prompt_tokens=cfg.learner.max_prompt_length,
    )
