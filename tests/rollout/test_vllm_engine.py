"""VLLMEngine's GPU-only paths, against a stand-in `vllm` module injected through sys.modules.

What runs on this CPU is tested on real vLLM (tests/rollout/test_vllm_real.py: generation,
in-place reload, the gloo broadcast, sleep/wake without sleep mode, crash clean-up). The
stand-in stands for a vLLM on a CUDA platform, for what cannot run here: the engine
arguments of a GPU preset, CUDA sleep mode (memory freed and restored by tags), the NCCL
sync calls, and an in-place reload that fails or hangs (the rebuild fallback and its
timeout: a real vLLM cannot be made to hang on demand). It records every call and refuses
keyword arguments that `VLLM_API` does not list (benchmarks/check_vllm_api.py checks that
list against the installed vLLM, in tests/rollout/test_vllm_real.py).
"""

from __future__ import annotations

import sys
import threading
import types
from dataclasses import dataclass, field

import pytest

from spo_ray.rollout.base import SamplingConfig
from spo_ray.rollout.vllm import EXTENSION, VLLM_API, VLLMEngine
from spo_ray.rollout.vllm_worker import SpoWorkerExtension
from spo_ray.rollout.weight_sync import SyncGroupSpec, TensorMeta, WeightPlan
from tests.conftest import compose

CALLS = {u.target: set(u.names) for u in VLLM_API if u.kind == "call"}


def _checked(target: str, kwargs: dict) -> dict:
    unknown = set(kwargs) - CALLS[target]
    assert not unknown, f"{target} called with {sorted(unknown)}, which VLLM_API does not list"
    return kwargs


# ----------------------------------------------------------------------------- the stand-in
@dataclass
class Behaviour:
    """What the stand-in does on the calls a test cares about."""

    rpc: str = "ok"  # ok | raise | hang
    build_s: float = 0.0  # how long LLM(...) takes
    release: threading.Event = field(default_factory=threading.Event)  # unblocks hung calls


class LLM:
    built: list["LLM"] = []
    behaviour = Behaviour()

    def __init__(self, **kwargs) -> None:
        self.kwargs = _checked("vllm.LLM", kwargs)
        self.calls: list[tuple] = []
        self.shut_down = False
        self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(shutdown=self._shutdown))
        if self.behaviour.build_s:
            self.behaviour.release.wait(self.behaviour.build_s)
        LLM.built.append(self)

    def _shutdown(self) -> None:
        self.shut_down = True

    def collective_rpc(self, method, **kwargs) -> list:
        kwargs = _checked("vllm.LLM.collective_rpc", kwargs)
        assert callable(getattr(SpoWorkerExtension, method, None)), f"no worker method {method}"
        self.calls.append(("collective_rpc", method, kwargs))
        if self.behaviour.rpc == "raise":
            raise AttributeError(f"'Worker' object has no attribute {method!r}")
        if self.behaviour.rpc == "hang":
            self.behaviour.release.wait(30)
        return [7]  # one worker, 7 tensors

    def reset_prefix_cache(self, **kwargs) -> bool:
        self.calls.append(("reset_prefix_cache", _checked("vllm.LLM.reset_prefix_cache", kwargs)))
        return True

    def sleep(self, **kwargs) -> None:
        self.calls.append(("sleep", _checked("vllm.LLM.sleep", kwargs)))

    def wake_up(self, **kwargs) -> None:
        self.calls.append(("wake_up", _checked("vllm.LLM.wake_up", kwargs)))


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__version__ = "0.0.0-fake"
    module.LLM = LLM
    platforms = types.ModuleType("vllm.platforms")  # a CUDA platform: no CPU settings, sleep mode
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: False, is_sleep_mode_available=lambda: True)
    LLM.built = []
    LLM.behaviour = Behaviour()
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    yield module
    LLM.behaviour.release.set()  # let abandoned threads finish


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    from spo_ray.modeling import build_char_tokenizer

    path = tmp_path_factory.mktemp("tok")
    build_char_tokenizer().save_pretrained(path)
    return str(path)


def _engine(path: str, **overrides) -> VLLMEngine:
    settings = dict(
        dtype="bfloat16", tensor_parallel_size=1, gpu_memory_utilization=0.5,
        max_model_len=512, enforce_eager=True, seed=3,
    )
    return VLLMEngine(path, **{**settings, **overrides})


SAMPLING = SamplingConfig(num_samples=3, temperature=0.7, top_p=0.9, max_new_tokens=16, seed=123)


# ----------------------------------------------------------------------------- tests
def test_missing_vllm_names_the_extra(monkeypatch, tokenizer_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm → ImportError
    with pytest.raises(ImportError, match=r"pip install 'spo_ray\[vllm\]'"):
        _engine(tokenizer_dir)


@pytest.mark.parametrize("colocate", [False, True])
def test_from_config_builds_llm_from_conf(fake_vllm, tokenizer_dir, colocate):
    _, cfg = compose([
        "experiment=mistral7b_sppo", f"cluster.colocate={str(colocate).lower()}",
        f"learner.persistent={str(not colocate).lower()}", f"evaluate.overlap={str(not colocate).lower()}",
    ])
    engine = VLLMEngine.from_config(cfg, tokenizer_dir)
    r = cfg.rollout
    assert LLM.built[0].kwargs == dict(
        model=tokenizer_dir,
        tensor_parallel_size=r.tensor_parallel_size,
        gpu_memory_utilization=r.gpu_memory_utilization,
        max_model_len=r.max_model_len,
        dtype=cfg.model.dtype,
        enforce_eager=r.enforce_eager,
        seed=cfg.run.seed,
        trust_remote_code=cfg.model.trust_remote_code,
        enable_sleep_mode=colocate,
        worker_extension_cls=EXTENSION,
    )
    assert engine.max_prompt_tokens == cfg.learner.max_prompt_length
    assert engine.reload_timeout_s == cfg.run.timeouts.weight_reload_s


def test_load_weights_rebuilds_when_in_place_fails(fake_vllm, tokenizer_dir):
    engine = _engine(tokenizer_dir)
    LLM.behaviour.rpc = "raise"
    engine.load_weights(tokenizer_dir + "/")
    old, new = LLM.built
    assert old.shut_down and engine.llm is new
    assert new.kwargs == {**old.kwargs, "model": tokenizer_dir + "/"}


def test_load_weights_rebuilds_when_in_place_hangs(fake_vllm, tokenizer_dir):
    # The hung reload is given up after half the timeout and the rebuild gets the rest: 2 s,
    # not 0.5 s, so the fake's build is not timed out on a loaded machine (seen in make test).
    engine = _engine(tokenizer_dir, reload_timeout_s=4.0)
    LLM.behaviour.rpc = "hang"
    engine.load_weights(tokenizer_dir)
    assert len(LLM.built) == 2 and LLM.built[0].shut_down


def test_load_weights_times_out_with_a_clear_error(fake_vllm, tokenizer_dir):
    engine = _engine(tokenizer_dir, reload_timeout_s=0.5)
    LLM.behaviour.rpc, LLM.behaviour.build_s = "hang", 30
    with pytest.raises(TimeoutError, match=r"reloading the policy .* took more than 0.5s"):
        engine.load_weights(tokenizer_dir)


def test_sleep_and_wake_for_colocated_training(fake_vllm, tokenizer_dir):
    engine = _engine(tokenizer_dir, enable_sleep_mode=True)
    # engine.llm, not LLM.built[0]: the timeout test's abandoned rebuild thread may append late
    llm = engine.llm
    engine.sleep(level=2)
    engine.sleep(level=2)  # idempotent
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(["hi"], SAMPLING)
    engine.load_weights(tokenizer_dir)  # weights back first, π_{t+1} in, then the KV cache
    assert [c[:2] if c[0] == "collective_rpc" else c for c in llm.calls] == [
        ("sleep", {"level": 2}),
        ("wake_up", {"tags": ["weights"]}),
        ("collective_rpc", "spo_load_checkpoint"),
        ("reset_prefix_cache", {}),
        ("wake_up", {"tags": ["kv_cache"]}),
    ]
    assert not engine.asleep
    engine.sleep(level=1)
    engine.wake_up()
    assert llm.calls[-1] == ("wake_up", {"tags": None}) and not engine.asleep


def test_sleep_needs_sleep_mode(fake_vllm, tokenizer_dir):
    with pytest.raises(RuntimeError, match="cluster.colocate=true"):
        _engine(tokenizer_dir).sleep()


def test_nccl_sync_calls(fake_vllm, tokenizer_dir):
    engine = _engine(tokenizer_dir)
    spec = SyncGroupSpec(host="10.0.0.1", port=29555, world_size=3, backend="nccl", timeout_s=60)
    plan = WeightPlan("bfloat16", ((TensorMeta("lm_head.weight", (4, 2)),),))
    engine.init_weight_sync(spec, rank_offset=1)
    assert engine.receive_weights(plan) == 7
    (_, m1, k1), (_, m2, k2), reset = engine.llm.calls
    assert (m1, k1) == ("spo_init_weight_sync", {"timeout": 60, "args": (spec.to_dict(), 1)})
    assert (m2, k2) == ("spo_receive_weights", {"timeout": 60, "args": (plan.to_dict(),)})
    assert reset[0] == "reset_prefix_cache"


# ----------------------------------------------------------------------------- worker side
def test_extension_names_cannot_clash_with_vllm_worker():
    names = [n for n in vars(SpoWorkerExtension) if not n.startswith("__")]
    assert names and all(n.startswith("spo_") for n in names)


def test_cpu_bind_env_names_every_core_this_process_may_use():
    import os

    from spo_ray.rollout.vllm import cpu_bind_env

    cores = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    assert cpu_bind_env("all") == {"VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert cpu_bind_env("0-3") == {"VLLM_CPU_OMP_THREADS_BIND": "0-3", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert cpu_bind_env("auto") == {}  # vLLM's own choice
