"""Rollout engines sample K responses per prompt: see `base.Engine`."""
