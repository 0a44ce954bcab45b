"""Judges rank the K responses of a prompt: see `base.Judge`."""

from spo_ray.judge.base import Judge, scores_from_logits

__all__ = ["Judge", "scores_from_logits"]
