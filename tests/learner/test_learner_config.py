import pytest

from spo_ray.learner.deepspeed_config import build_deepspeed_config, gradient_accumulation_steps, linear_schedule, zero_stage
from tests.conftest import compose


def test_deepspeed_config_from_ours():
    _, cfg = compose(["experiment=tiny", "learner.micro_batch_size=2", "learner.global_batch_size=16", "learner.zero_stage=3"])
    ds = build_deepspeed_config(cfg.learner, world_size=4)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2  # 16 = 2 × 2 × 4
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    assert ds["bf16"] == {"enabled": False} and ds["gradient_clipping"] == cfg.learner.grad_clip
    assert ds["zero_allow_untested_optimizer"] is True


def test_batch_that_does_not_divide_names_the_fix():
    _, cfg = compose(["experiment=tiny", "learner.micro_batch_size=4", "learner.global_batch_size=8"])
    assert gradient_accumulation_steps(cfg.learner, 1) == 2
    with pytest.raises(ValueError, match="num_workers"):
        gradient_accumulation_steps(cfg.learner, 3)


def test_linear_schedule_warmup_then_decay():
    # 10 steps, 20 % warm-up = 2 steps: 1/3, 2/3, then (10−s)/8 from step 2
    got = [linear_schedule(s, 10, 0.2) for s in range(10)]
    want = [1 / 3, 2 / 3, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8]
    assert got == pytest.approx(want)
    assert linear_schedule(0, 5, 0.0) == 1.0


def test_a_single_worker_runs_without_zero():
    # ZeRO partitions across workers: with one there is nothing to partition, only overhead.
    _, cfg = compose(["experiment=tiny", "learner.micro_batch_size=2", "learner.global_batch_size=16", "learner.zero_stage=3"])
    assert zero_stage(cfg.learner, 1) == 0 and zero_stage(cfg.learner, 2) == 3
    assert build_deepspeed_config(cfg.learner, world_size=1)["zero_optimization"] == {"stage": 0}


def test_a_cpu_worker_takes_learner_num_threads_else_keeps_rays():
    import torch

    from spo_ray.learner.loop import worker_device

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # what Ray's OMP_NUM_THREADS gives a 0.5-CPU worker
        _, cfg = compose(["experiment=tiny"])
        assert worker_device(cfg) == torch.device("cpu") and torch.get_num_threads() == 1
        _, cfg = compose(["experiment=tiny", "learner.num_threads=2"])
        assert worker_device(cfg) == torch.device("cpu") and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
