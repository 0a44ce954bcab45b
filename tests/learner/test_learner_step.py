"""The learner step without Ray (spo_ray/learner/step.py): a tiny random policy in the
learner's own DeepSpeed engine, in a one-process gloo group.

The expected losses are computed apart from the step: token log-probs from a full
log-softmax at every position, summed over the response tokens, and the SPPO loss written
out (DESIGN.md §1): ½[(a − η(p̂_w − ½))² + (b − η(p̂_l − ½))²], η = 1/β.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from spo_ray.data.schema import collate_pairs, collate_shared_pairs, filler_row
from spo_ray import dtypes
from spo_ray.learner.deepspeed_config import build_deepspeed_config, linear_schedule
from spo_ray.learner.models import build_models, make_optimizer, reference_dtype, single_process_group
from spo_ray.learner.step import (
    LearnerModels,
    TorchEngine,
    accumulate_gradients,
    learner_step,
    response_logps,
    shared_prompt_refusal,
    shared_response_logps,
    step_groups,
    with_stand_ins,
)
from spo_ray.sppo import preference_loss
from tests.conftest import compose


@pytest.fixture(scope="module")
def one_process_group():
    with single_process_group():
        yield


def _pair(n: int, win: float, lose: float) -> dict:
    return {"prompt_id": f"p{n}", "prompt": "Say " + "something " * n, "chosen": "yes " * (n + 2), "rejected": "no" * n,
            "chosen_probs_win": win, "chosen_probs_lose": lose, "iteration": 1, "skip_reason": ""}


# Two micro-batches of two pairs; the last slot a filler (weight 0).
GROUP = [[_pair(1, 0.8, 0.2), _pair(2, 0.6, 0.45)], [_pair(3, 0.9, 0.1), filler_row()]]


def _models(tiny_policy: str, *overrides: str, **kwargs):
    _, cfg = compose(["experiment=tiny", "learner.micro_batch_size=2", "learner.global_batch_size=4",
                      "learner.reference_dtype=float32", *overrides])
    return cfg, build_models(cfg, tiny_policy, torch.device("cpu"), world=1, total_steps=4, **kwargs)


def _response_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Σ over response tokens of log π(token | prefix), from the full log-softmax."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (token_logps * batch["loss_mask"][:, 1:]).sum(-1)


def _expected(models, cfg, group) -> dict:
    """Loss, a and b summed over the group's weighted pairs, computed apart from the step."""
    totals = {"loss": 0.0, "chosen_logratio": 0.0, "rejected_logratio": 0.0, "pairs": 0.0}
    eta = 1.0 / cfg.learner.beta
    for rows in group:
        batch = collate_pairs(with_stand_ins(rows), models.tokenizer, cfg.learner.max_length, cfg.learner.max_prompt_length)
        policy, reference = _response_logps(models.engine.module, batch), _response_logps(models.reference, batch)
        n = len(rows)
        a, b = policy[:n] - reference[:n], policy[n:] - reference[n:]
        win, lose = batch["chosen_probs_win"], batch["chosen_probs_lose"]
        per_pair = 0.5 * ((a - eta * (win - 0.5)) ** 2 + (b - eta * (lose - 0.5)) ** 2)
        library = preference_loss(policy[:n], policy[n:], reference[:n], reference[n:], loss_type="sppo",
                                  beta=cfg.learner.beta, chosen_probs_win=win, chosen_probs_lose=lose)
        torch.testing.assert_close(library, per_pair)
        weight = torch.tensor([0.0 if r["skip_reason"] else 1.0 for r in rows])
        totals["loss"] += (per_pair * weight).sum().item()
        totals["chosen_logratio"] += (a * weight).sum().item()
        totals["rejected_logratio"] += (b * weight).sum().item()
        totals["pairs"] += weight.sum().item()
    return totals


def _sums(sums) -> dict:
    return {k: getattr(sums, k) for k in ("loss", "chosen_logratio", "rejected_logratio", "pairs")}


def test_step_loss_is_the_sppo_loss_of_policy_and_reference(tiny_policy, one_process_group):
    cfg, models = _models(tiny_policy)
    # π_θ = π_t at the start: a = b = 0 and the loss is ½η²[(p̂_w − ½)² + (p̂_l − ½)²].
    first = accumulate_gradients(models, GROUP, cfg.learner)
    eta = 1.0 / cfg.learner.beta
    by_hand = sum(0.5 * eta**2 * ((w - 0.5) ** 2 + (lo - 0.5) ** 2) for w, lo in ((0.8, 0.2), (0.6, 0.45), (0.9, 0.1)))
    assert first.loss == pytest.approx(by_hand, rel=1e-5)
    assert (first.chosen_logratio, first.rejected_logratio) == (pytest.approx(0, abs=1e-4), pytest.approx(0, abs=1e-4))
    assert (first.pairs, first.rows) == (3, 4)
    models.engine.step()
    # After an optimizer step the policy has moved: a, b ≠ 0, and the loss still follows the formula.
    expected = _expected(models, cfg, GROUP)
    second = learner_step(models, GROUP, cfg.learner)
    assert abs(expected["chosen_logratio"]) > 1e-3
    assert _sums(second) == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert second.grad_norm is not None and second.grad_norm > 0


def test_gradients_reach_the_policy_only(tiny_policy, one_process_group):
    cfg, models = _models(tiny_policy)
    reference_before = copy.deepcopy(models.reference.state_dict())
    policy_before = copy.deepcopy(models.engine.module.state_dict())
    accumulate_gradients(models, GROUP, cfg.learner)
    policy_params = list(models.engine.module.named_parameters())
    assert all(p.requires_grad and p.grad is not None for _, p in policy_params)
    assert sum(p.grad.abs().sum().item() > 0 for _, p in policy_params) >= len(policy_params) - 1  # all but unused rows
    assert all(not p.requires_grad and p.grad is None for p in models.reference.parameters())
    models.engine.step()
    assert any(not torch.equal(policy_before[k], v) for k, v in models.engine.module.state_dict().items())
    assert all(torch.equal(reference_before[k], v) for k, v in models.reference.state_dict().items())


def test_torch_engine_steps_as_deepspeed_does(tiny_policy, one_process_group):
    """TorchEngine (benchmarks on machines without DeepSpeed) accumulates, clips and steps
    the LR schedule as the learner's DeepSpeed engine does."""
    cfg, models = _models(tiny_policy, "learner.grad_clip=0.01")  # a clip that bites
    policy = copy.deepcopy(models.engine.module)
    optimizer = make_optimizer(cfg.learner, policy.parameters(), torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_schedule(s, 4, cfg.learner.warmup_ratio))
    plain = TorchEngine(policy, optimizer, accumulation_steps=2, grad_clip=cfg.learner.grad_clip, scheduler=scheduler)
    plain_models = LearnerModels(models.tokenizer, plain, models.reference)
    for _ in range(2):
        ours = learner_step(plain_models, GROUP, cfg.learner)
        theirs = learner_step(models, GROUP, cfg.learner)
        assert _sums(ours) == pytest.approx(_sums(theirs), rel=1e-5, abs=1e-5)
        assert ours.grad_norm == pytest.approx(theirs.grad_norm, rel=1e-4)
    for name, value in models.engine.module.state_dict().items():
        torch.testing.assert_close(policy.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_step_groups_chunk_rows_into_micro_batches_and_steps():
    groups = list(step_groups(range(11), micro_batch_size=2, accumulation_steps=3))
    assert groups == [[[0, 1], [2, 3], [4, 5]], [[6, 7], [8, 9], [10]]]
    assert list(step_groups([], 2, 3)) == []


def test_the_faster_step_keeps_the_losses(tiny_policy, one_process_group):
    """ZeRO stage 0 for one worker, fused AdamW and the LM head on response positions only
    give the losses, log-ratios and weights of the step as it was (ZeRO-2, AdamW's
    for-each kernel, logits at every position), to float precision, over three steps."""
    cfg, before = _models(tiny_policy, deepspeed_config={**build_deepspeed_config(_cfg().learner, 1), "zero_optimization": {"stage": 2}},
                          fused=False)
    _, after = _models(tiny_policy)
    assert (before.engine.zero_optimization_stage(), after.engine.zero_optimization_stage()) == (2, 0)
    assert after.engine.optimizer.defaults["fused"] and not before.engine.optimizer.optimizer.defaults["fused"]  # ZeRO wraps it
    for _ in range(3):
        old = learner_step(before, GROUP, cfg.learner, full_logits=True)
        new = learner_step(after, GROUP, cfg.learner)
        assert _sums(new) == pytest.approx(_sums(old), rel=1e-5, abs=1e-4)
        assert new.grad_norm == pytest.approx(old.grad_norm, rel=1e-5)
    for name, value in after.engine.module.state_dict().items():
        torch.testing.assert_close(value, before.engine.module.state_dict()[name], rtol=1e-5, atol=1e-6)


def test_response_logps_scores_the_same_tokens_as_the_full_logits(tiny_policy, one_process_group):
    _, models = _models(tiny_policy)
    rows = [_pair(1, 0.8, 0.2), _pair(7, 0.6, 0.4), filler_row()]  # prompts of different lengths, a stand-in
    batch = collate_pairs(with_stand_ins(rows), models.tokenizer, 128, 64)
    with torch.no_grad():
        band = response_logps(models.reference, models.reference, batch)
        full = response_logps(models.reference, models.reference, batch, full_logits=True)
    torch.testing.assert_close(band, full, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(full, _response_logps(models.reference, batch), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_scores_what_two_sequences_score(tiny_policy, one_process_group, attention):
    """One sequence per pair (prompt once) gives each response the log-prob it has in its
    own sequence: prompts of different lengths, a stand-in, a prompt and responses cut."""
    _, models = _models(tiny_policy)
    model = copy.deepcopy(models.reference)
    model.config._attn_implementation = attention
    rows = with_stand_ins([_pair(1, 0.8, 0.2), _pair(7, 0.6, 0.4), filler_row(), _pair(30, 0.7, 0.3)])
    for max_length, max_prompt_length in ((256, 128), (48, 32)):
        two = collate_pairs(rows, models.tokenizer, max_length, max_prompt_length)
        one = collate_shared_pairs(rows, models.tokenizer, max_length, max_prompt_length)
        with torch.no_grad():
            expected = _response_logps(model, two)
            torch.testing.assert_close(shared_response_logps(model, model, one), expected, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(shared_response_logps(model, model, one, full_logits=True), expected, rtol=1e-5, atol=1e-4)


def test_shared_prompt_step_keeps_the_losses(tiny_policy, one_process_group):
    """learner.shared_prompt=true trains as two sequences per pair do: sums, gradient norms
    and weights equal to float precision over three steps."""
    cfg, shared = _models(tiny_policy)
    no_cfg, two = _models(tiny_policy, "learner.shared_prompt=false")
    assert shared.shares_prompt(cfg.learner) and not two.shares_prompt(no_cfg.learner)
    for _ in range(3):
        old = learner_step(two, GROUP, no_cfg.learner)
        new = learner_step(shared, GROUP, cfg.learner)
        assert _sums(new) == pytest.approx(_sums(old), rel=1e-5, abs=1e-4)
        assert new.grad_norm == pytest.approx(old.grad_norm, rel=1e-5)
    for name, value in shared.engine.module.state_dict().items():
        torch.testing.assert_close(value, two.engine.module.state_dict()[name], rtol=1e-5, atol=1e-6)


def test_a_model_that_cannot_share_the_prompt_runs_two_sequences(tiny_policy, one_process_group, caplog):
    cfg, models = _models(tiny_policy)
    assert shared_prompt_refusal(models.reference, 320) is None
    flash = copy.deepcopy(models.reference)
    flash.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in shared_prompt_refusal(flash, 320)
    windowed = copy.deepcopy(models.reference)
    windowed.config.sliding_window = 256
    assert "sliding window (256 tokens)" in shared_prompt_refusal(windowed, 320)
    assert shared_prompt_refusal(windowed, 256) is None
    models.reference = windowed
    with caplog.at_level("WARNING", logger="spo_ray.learner.step"):
        assert not models.shares_prompt(dataclasses.replace(cfg.learner, max_length=320))
        assert not models.shares_prompt(dataclasses.replace(cfg.learner, max_length=320))
    assert [r.getMessage() for r in caplog.records] == [
        "learner.shared_prompt: its sliding window (256 tokens) is shorter than learner.max_length (320); "
        "each pair runs as two sequences"
    ]


def test_bf16_reference_moves_the_log_ratios_by_little(tiny_policy, one_process_group):
    cfg, exact = _models(tiny_policy)
    _, bf16 = _models(tiny_policy, "learner.reference_dtype=bfloat16")
    assert next(bf16.reference.parameters()).dtype == torch.bfloat16
    old = accumulate_gradients(exact, GROUP, cfg.learner)
    new = accumulate_gradients(bf16, GROUP, cfg.learner)
    assert (old.chosen_logratio, old.rejected_logratio) == (pytest.approx(0, abs=1e-4), pytest.approx(0, abs=1e-4))
    assert abs(new.chosen_logratio) < 0.05 and abs(new.rejected_logratio) < 0.05  # nats, summed over 3 pairs
    assert new.loss == pytest.approx(old.loss, rel=1e-2)


def test_reference_dtype_auto_is_the_policys_even_where_bf16_is_fast(monkeypatch):
    learner = _cfg().learner
    cpu = torch.device("cpu")
    monkeypatch.setattr(dtypes, "cpu_has_fast_bf16", lambda: True)
    assert reference_dtype(learner, cpu) == "float32"  # a float32 policy: exact log-ratios
    assert reference_dtype(dataclasses.replace(learner, bf16=True), cpu) == "bfloat16"
    assert reference_dtype(dataclasses.replace(learner, reference_dtype="bfloat16"), cpu) == "bfloat16"
    assert reference_dtype(dataclasses.replace(learner, bf16=True, reference_dtype="float32"), cpu) == "float32"


def _cfg():
    return compose(["experiment=tiny"])[1]
