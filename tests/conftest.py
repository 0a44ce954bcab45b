"""Shared fixtures: one local Ray instance per test session, tiny random policies."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REPO = Path(__file__).resolve().parents[1]
TINY_SPEC = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=256)


@pytest.fixture(scope="session")
def fault_dir(tmp_path_factory) -> Path:
    """The session's fault-injection folder (spo_ray/faults.py), known to every Ray worker."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="session")
def ray_session(fault_dir):
    """A local Ray with 2 CPUs, shared by every test that needs one (start-up is slow).

    Its workers see SPO_RAY_FAULT_DIR (not SPO_RAY_FAULT): a test arms a fault by writing
    the spec file there (`arm_fault`), without restarting Ray. The test process itself
    never reads it, so a fault can only kill Ray's workers, not pytest.
    """
    import ray

    from spo_ray.faults import FAULT_DIR_ENV

    from spo_ray.train import start_local_ray

    if not ray.is_initialized():
        # address "local", as a run starts it: never a cluster named by RAY_ADDRESS or left
        # behind by another run; idle workers kept for the next stream.
        start_local_ray(2, include_dashboard=False, log_to_driver=True, runtime_env={"env_vars": {FAULT_DIR_ENV: str(fault_dir)}})
    ctx = ray.data.DataContext.get_current()
    ctx.execution_no_progress_timeout_s = 300  # a hung stream fails the test instead of waiting 30 min
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def arm_fault(ray_session, fault_dir):
    """`with arm_fault("rollout_batch@2") as folder:` — the fault is armed for the body only.

    Entering clears earlier counts and markers and writes the spec; leaving removes the
    spec (markers stay, so `spo_ray.faults.fired(site, folder)` can be checked after).
    """
    from spo_ray.faults import SPEC_FILE, reset

    @contextmanager
    def arm(spec: str) -> Iterator[Path]:
        reset(fault_dir)
        (fault_dir / SPEC_FILE).write_text(spec)
        try:
            yield fault_dir
        finally:
            (fault_dir / SPEC_FILE).unlink(missing_ok=True)

    return arm


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> str:
    """A seeded tiny random Llama policy with a character tokenizer, saved as an HF folder."""
    from types import SimpleNamespace

    from spo_ray.modeling import build_random_policy, save_policy

    model, tokenizer = build_random_policy(SimpleNamespace(**TINY_SPEC), seed=0)
    return str(save_policy(model, tokenizer, tmp_path_factory.mktemp("policy") / "pi0"))


def compose(overrides: list[str] | None = None):
    """Compose conf/ with Hydra as `python -m spo_ray.train` would, and validate it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from spo_ray.compose import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        raw = hydra_compose(config_name="config", overrides=overrides or [])
    return raw, validate(raw)


def broadcast_to(engine, source, bucket_bytes: int) -> tuple[object, int]:
    """Learner rank 0 (a thread here) sends `source`'s weights over gloo, in buckets of
    `bucket_bytes`, to `engine` as rank 1 (`rollout.weight_sync=nccl` on CPU). Returns the
    plan and the number of tensors the engine received; raises what the sender raised."""
    import threading

    from spo_ray.rollout.engines import free_port
    from spo_ray.rollout.weight_sync import SyncGroupSpec, create_sync_group, plan_for_module, send_weights

    plan = plan_for_module(source, "float32", bucket_bytes=bucket_bytes)
    spec = SyncGroupSpec("127.0.0.1", free_port(), world_size=2, backend="gloo", timeout_s=60)
    errors: list[BaseException] = []

    def learner() -> None:
        try:
            group = create_sync_group(spec, 0, "cpu")
            send_weights(source, plan, group)
            group.close()
        except BaseException as err:  # noqa: BLE001 - raised in the caller's thread
            errors.append(err)

    thread = threading.Thread(target=learner)
    thread.start()
    engine.init_weight_sync(spec, rank_offset=1)
    count = engine.receive_weights(plan)
    engine.close_weight_sync()
    thread.join(60)
    if errors:
        raise errors[0]
    return plan, count
