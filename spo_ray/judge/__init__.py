"""Judges rank the K responses of a prompt: see `base.Judge`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spo_ray.judge.base import Judge, scores_from_logits

if TYPE_CHECKING:
    from spo_ray.config import JudgeConfig

__all__ = ["Judge", "build_judge", "scores_from_logits"]


def build_judge(cfg: "JudgeConfig", device: str = "cpu") -> Judge:
    """The judge named by `judge.name`, built from its section of the config."""
    if cfg.name == "keyword":
        from spo_ray.judge.rules import KeywordJudge

        return KeywordJudge(cfg.keyword.target, cfg.keyword.temperature)
    if cfg.name == "length":
        from spo_ray.judge.rules import LengthJudge

        return LengthJudge()
    if cfg.name == "pairrm":
        from spo_ray.judge.pairrm import PairRMJudge

        p = cfg.pairrm
        return PairRMJudge.from_pretrained(
            p.name_or_path, device=device, dtype=p.dtype, backbone=p.backbone, token_budget=p.token_budget
        )
    if cfg.name == "lm":
        from spo_ray.judge.lm_judge import LMJudge

        return LMJudge.from_pretrained(cfg.lm.name_or_path, device=device, dtype=cfg.lm.dtype)
    # The reference-guided judge needs each prompt's reference answer, which the stream
    # does not carry yet (issue 8); it is usable directly: spo_ray.judge.reference.
    raise ValueError(f"judge.name={cfg.name!r} cannot run in the training stream yet; use keyword, length, pairrm or lm")
