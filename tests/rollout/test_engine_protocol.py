"""Both engines keep the PersistentEngine protocol (spo_ray/rollout/base.py): every call an
EngineActor makes, with the same parameters. Checked on the classes, so without a model."""

from __future__ import annotations

import inspect

import pytest

from spo_ray.rollout.base import PersistentEngine
from spo_ray.rollout.hf import HFEngine
from spo_ray.rollout.vllm import VLLMEngine

CALLS = ("generate", "load_weights", "shutdown", "sleep", "init_weight_sync", "receive_weights", "close_weight_sync")


@pytest.mark.parametrize("engine", [HFEngine, VLLMEngine])
def test_every_call_an_engine_actor_makes_is_there_with_the_protocols_parameters(engine):
    for name in CALLS:
        expected = list(inspect.signature(getattr(PersistentEngine, name)).parameters)
        assert list(inspect.signature(getattr(engine, name)).parameters) == expected, f"{engine.__name__}.{name}"
    assert hasattr(engine, "sync_world_size"), f"{engine.__name__} has no sync_world_size"
