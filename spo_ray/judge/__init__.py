"""Judges rank the K responses of a prompt: see `base.Judge`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from spo_ray.judge.base import Judge, scores_from_logits

if TYPE_CHECKING:
    from spo_ray.config import JudgeConfig

__all__ = ["Judge", "attach_references", "build_judge", "scores_from_logits"]


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
    if cfg.name == "reference":
        from spo_ray.judge.reference import ReferenceJudge

        r = cfg.reference
        return ReferenceJudge.from_pretrained(r.name_or_path, temperature=r.temperature, device=device)
    if cfg.name == "cyclic":
        from spo_ray.judge.cyclic import CyclicJudge

        return CyclicJudge(cfg.cyclic.win_probs)
    raise ValueError(f"judge.name={cfg.name!r} is not one of keyword, length, pairrm, reference, lm, cyclic")


def attach_references(judge: Judge, prompts: Sequence[str], references: Sequence[str | None]) -> None:
    """Give a judge that needs them (`needs_references`) the reference answers of the
    prompts it is about to judge, keyed by the prompt text it will see. A prompt without
    a reference is an error there (naming the prompt), never a silent tie."""
    if getattr(judge, "needs_references", False):
        judge.set_references(dict(zip(prompts, references)))
