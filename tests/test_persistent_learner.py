"""The persistent learner (spo_ray/learner/persistent.py, `learner.persistent=true`): the same
policies as a learner started per iteration, the reference set to π_t at each iteration's
start, and resume after a lost learner worker."""

from __future__ import annotations

import json

import pytest
import torch

from spo_ray.learner.deepspeed_config import linear_schedule
from spo_ray.learner.models import build_models, single_process_group
from spo_ray.learner.persistent import next_iteration
from tests.conftest import compose

# Two iterations of 8 prompts, 2 steps per epoch, 2 epochs, a step checkpoint after each step.
FAST = [
    "experiment=tiny", "data.prompts_per_iteration=8", "data.num_eval=4", "rollout.num_samples=3",
    "rollout.max_new_tokens=8", "evaluate.max_new_tokens=8", "learner.micro_batch_size=2",
    "learner.global_batch_size=4", "learner.checkpoint_every=1", "run.deterministic=true",
]


def test_next_iteration_sets_the_reference_to_the_saved_policy_and_starts_a_fresh_optimizer(tiny_policy):
    """In place, without Ray: the policy rounded to model.dtype (as π_{t+1} is saved), the
    reference equal to it, no optimizer state, the LR schedule at its first step."""
    _, cfg = compose(["experiment=tiny", "model.dtype=bfloat16", "learner.reference_dtype=float32"])
    with single_process_group():
        models = build_models(cfg, tiny_policy, torch.device("cpu"), world=1, total_steps=4)
        optimizer = models.scheduler.optimizer
        for _ in range(3):  # a trained policy: moved weights, optimizer state, a later LR
            for p in models.engine.module.parameters():
                p.grad = torch.randn_like(p)
            optimizer.step()
            models.scheduler.step()
        trained = {n: p.detach().clone() for n, p in models.engine.module.named_parameters()}
        assert any(not torch.equal(trained[n], r) for n, r in models.reference.named_parameters())

        ready = next_iteration(models, cfg, world=1, steps=10)

        for name, ref in ready.reference.named_parameters():
            saved = trained[name].to(torch.bfloat16).float()
            assert torch.equal(dict(ready.engine.module.named_parameters())[name], saved), name
            assert torch.equal(ref, saved) and not ref.requires_grad, name
        assert len(optimizer.state) == 0
        assert ready.scheduler is ready.engine.lr_scheduler and ready.scheduler is not models.scheduler
        assert ready.scheduler.get_last_lr()[0] == pytest.approx(cfg.learner.lr * linear_schedule(0, 10, cfg.learner.warmup_ratio))
        assert ready.engine.module.training and ready.engine.module.config.use_cache is False


def _run(run_dir, *overrides):
    from spo_ray.train import run_sppo

    _, cfg = compose([*FAST, f"run.dir={run_dir}", *overrides])
    return run_sppo(cfg)


def _weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _assert_same_weights(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    for name, tensor in wa.items():
        assert torch.equal(tensor, wb[name]), name


def _stages(run, t: int) -> set[str]:
    return {s["name"] for s in json.loads(run.timeline(t).read_text())["stages"]}


@pytest.fixture(scope="module")
def per_iteration_run(ray_session, tmp_path_factory):
    """π_1 and π_2 of the learner started per iteration: what the persistent one must match."""
    return _run(tmp_path_factory.mktemp("per_iteration") / "run", "learner.persistent=false", "run.iterations=2")


@pytest.mark.fault
def test_persistent_learner_trains_the_policies_of_a_learner_per_iteration_also_after_a_lost_worker(per_iteration_run, arm_fault, tmp_path):
    """Two iterations on one Ray Train run, whose learner worker exits after iteration 2's
    first step (and its checkpoint). Ray Train restarts the workers: they load π_1, resume at
    step 1, and the driver hands them a fresh stream of the 4 prompts not yet persisted (the
    second rollout batch, so the same samples). π_1 and π_2 are bit-identical to those of a
    trainer per iteration; no prompt is lost or repeated. (A driver restarted between
    iterations starts a new persistent learner at iteration 2: tests/test_train_e2e.py;
    killed mid-iteration: tests/test_driver_kill.py.)"""
    from spo_ray.faults import fired
    from spo_ray.learner.resume import persisted_rows

    clean = {t: per_iteration_run.read_jsonl(per_iteration_run.iteration(t).train_metrics) for t in (1, 2)}
    with arm_fault(f"learner_step@{len(clean[1]) + 1}") as folder:
        run = _run(tmp_path / "run", "learner.persistent=true", "run.iterations=2")
        assert fired("learner_step", folder), "the fault never fired: the test proves nothing"

    for t in (1, 2):
        _assert_same_weights(run.policy(t), per_iteration_run.policy(t))
        steps = run.read_jsonl(run.iteration(t).train_metrics)
        assert [(s["step"], s["prompt_ids"], s["loss"], s["lr"]) for s in steps] == [(s["step"], s["prompt_ids"], s["loss"], s["lr"]) for s in clean[t]]
        # The reference is π_{t-1} at the iteration's start: the first step's log-ratios are
        # exactly 0 (with π_0 still as reference, iteration 2's would not be), later ones not.
        assert steps[0]["chosen_logratio"] == steps[0]["rejected_logratio"] == 0.0
        assert any(s["chosen_logratio"] != 0.0 for s in steps[1:])
    ids = [r["prompt_id"] for r in persisted_rows(run.iter_dir(2))]
    assert len(ids) == len(set(ids)) == 8
    summary = run.read_json(run.iteration(2).learner_summary)
    assert summary["resumed_from_step"] == 1 and summary["streamed_rows"] == 4 and summary["replayed_rows"] == 0
    # The workers started in iteration 1; iteration 2 first reset the models they held, then
    # (after the lost worker) started new workers that loaded π_1.
    assert {"learner_workers", "learner_models"} <= _stages(run, 1) and "learner_reset" not in _stages(run, 1)
    assert {"learner_reset", "learner_workers", "learner_models"} <= _stages(run, 2)
