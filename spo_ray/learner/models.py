"""What a learner worker trains with: the policy in a DeepSpeed engine, the frozen reference,
the tokenizer and the LR schedule. No Ray: a benchmark or a test builds them in one process
inside `single_process_group()`."""

from __future__ import annotations

import os
import socket
import sys
from contextlib import contextmanager
from typing import Iterator

import torch

from spo_ray.config import Config, LearnerConfig
from spo_ray.learner.deepspeed_config import build_deepspeed_config, linear_schedule
from spo_ray.learner.step import LearnerModels

FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch (≥ 2.4) has a fused AdamW kernel


def make_optimizer(cfg: LearnerConfig, params, device: torch.device, fused: bool | None = None) -> torch.optim.Optimizer:
    """RMSprop (the paper's) or AdamW. AdamW runs torch's fused kernel where torch has one
    for the device (`fused=None`): one pass over all tensors instead of a loop of small ops
    (SmolLM2-135M on 2 CPUs: 0.33 → 0.09 s per step). torch has no fused RMSprop."""
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if fused is None:
        fused = device.type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def build_models(
    cfg: Config,
    policy_path: str,
    device: torch.device,
    world: int,
    total_steps: int,
    *,
    deepspeed_config: dict | None = None,
    fused: bool | None = None,
) -> LearnerModels:
    """Policy and reference loaded from `policy_path`, the policy wrapped in a DeepSpeed
    engine. Needs torch.distributed initialized (Ray Train does it; without Ray,
    `single_process_group()`). `deepspeed_config` and `fused` replace what `cfg` implies,
    for comparisons (benchmarks/learner_step.py)."""
    import deepspeed

    from spo_ray.modeling import load_policy, load_tokenizer

    l = cfg.learner
    tokenizer = load_tokenizer(policy_path, cfg.model.trust_remote_code)
    model = load_policy(policy_path, "float32", device, cfg.model.trust_remote_code)
    reference = load_policy(policy_path, reference_dtype(l, device), device, cfg.model.trust_remote_code)
    reference.eval().requires_grad_(False)  # π_t, frozen for the whole iteration
    if l.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    optimizer = make_optimizer(l, model.parameters(), device, fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_schedule(s, total_steps, l.warmup_ratio))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config or build_deepspeed_config(l, world),
        dist_init_required=False,
    )
    # from_pretrained returns the model in eval mode, and transformers recomputes activations
    # only when `gradient_checkpointing and self.training`: without this, checkpointing is a
    # no-op (and dropout is off).
    engine.train()
    return LearnerModels(tokenizer, engine, reference, scheduler)


def reference_dtype(cfg: LearnerConfig, device: torch.device) -> str:
    """The frozen reference's dtype: `learner.reference_dtype`, where `auto` is the policy's
    own (bfloat16 with `learner.bf16`, else float32). A bf16 reference beside a float32
    policy is opt-in: on SmolLM2-135M it moved the loss by up to 1.9 % and each log-ratio by
    0.1–0.5 nats — as large as what an iteration learns — for a gain lost in this machine's
    noise, and on an AVX2-only CPU a bf16 reference made the step 2× slower
    (benchmarks/results/learner_step_cpu.json). `device` is kept for a device-aware choice
    (`spo_ray.dtypes.cpu_has_fast_bf16` tells where bf16 is fast on CPU)."""
    if cfg.reference_dtype != "auto":
        return cfg.reference_dtype
    return "bfloat16" if cfg.bf16 else "float32"


@contextmanager
def single_process_group() -> Iterator[None]:
    """The gloo group of one worker, and the launcher's variables DeepSpeed reads, as Ray
    Train would set them up: for `build_models` without Ray. Both are undone on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    saved = {name: os.environ.get(name) for name in launcher}
    os.environ.update(launcher)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        deepspeed_comm = sys.modules.get("deepspeed.comm.comm")
        if deepspeed_comm is not None and deepspeed_comm.cdb is not None:
            deepspeed_comm.destroy_process_group()  # also drops DeepSpeed's cached groups, so a later group is its group
        else:
            torch.distributed.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
