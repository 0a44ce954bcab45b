"""The learner trains its policy in training mode, so `learner.gradient_checkpointing`
really recomputes activations; the reference π_t stays in eval mode.

Runs the learner's own set-up (`build_models`) and step (`accumulate_gradients`) in this
process on a one-process gloo group, without Ray.
"""

from __future__ import annotations

import pytest
import torch

from spo_ray.learner.models import build_models, single_process_group
from spo_ray.learner.step import accumulate_gradients
from tests.conftest import compose


@pytest.fixture(scope="module")
def one_process_group():
    """The process group (and the launcher's variables DeepSpeed checks) that Ray Train
    would have set up for a single worker."""
    with single_process_group():
        yield


def _pair(n: int) -> dict:
    return {"prompt_id": f"p{n}", "prompt": f"Say {n}.", "chosen": "yes " * 3, "rejected": "no",
            "chosen_probs_win": 0.7, "chosen_probs_lose": 0.3, "iteration": 1, "skip_reason": ""}


def _step_trace(tiny_policy: str, checkpointing: bool) -> dict:
    """Runs one learner step and records each call of the first decoder layer's `forward`
    (a recomputation in backward calls it again; module hooks do not fire there) and the
    training flag it saw, for the policy and for the reference."""
    _, cfg = compose([
        "experiment=tiny", "learner.micro_batch_size=2", "learner.global_batch_size=2",
        f"learner.gradient_checkpointing={str(checkpointing).lower()}",
    ])
    models = build_models(cfg, tiny_policy, torch.device("cpu"), world=1, total_steps=1)
    trace: dict = {"policy": [], "reference": []}

    def record(name: str, layer: torch.nn.Module) -> None:
        forward = layer.forward

        def traced(*args, **kwargs):
            trace[name].append(layer.training)
            return forward(*args, **kwargs)

        layer.forward = traced

    record("policy", models.engine.module.model.layers[0])
    record("reference", models.reference.model.layers[0])
    accumulate_gradients(models, [[_pair(0), _pair(1)]], cfg.learner)
    return trace


def test_policy_trains_in_training_mode_with_activations_recomputed(tiny_policy, one_process_group):
    # One micro-batch: the policy's layer runs forward once, in training mode, and once more
    # in backward to recompute its activations; the reference runs once, in eval mode.
    trace = _step_trace(tiny_policy, checkpointing=True)
    assert trace == {"policy": [True, True], "reference": [False]}


def test_without_checkpointing_the_layer_runs_once(tiny_policy, one_process_group):
    trace = _step_trace(tiny_policy, checkpointing=False)
    assert trace == {"policy": [True], "reference": [False]}
