"""VLLMEngine on CPU, against a stand-in `vllm` module injected through sys.modules.

The stand-in records every call, refuses keyword arguments that `VLLM_API` does not list
(benchmarks/check_vllm_api.py checks that list against a real vLLM), and returns objects
shaped like vLLM's RequestOutput / CompletionOutput. vLLM itself and NCCL are not run.
"""

from __future__ import annotations

import sys
import threading
import types
from dataclasses import dataclass, field

import pytest
import torch

from spo_ray.rollout.base import SamplingConfig
from spo_ray.rollout.hf import format_prompt
from spo_ray.rollout.vllm import EXTENSION, VLLM_API, SpoWorkerExtension, VLLMEngine
from spo_ray.rollout.weight_sync import SyncGroupSpec, TensorMeta, WeightPlan
from tests.conftest import compose

CALLS = {u.target: set(u.names) for u in VLLM_API if u.kind == "call"}
FIELDS = {u.target: set(u.names) for u in VLLM_API if u.kind in ("fields", "attrs")}


def _checked(target: str, kwargs: dict) -> dict:
    unknown = set(kwargs) - CALLS[target]
    assert not unknown, f"{target} called with {sorted(unknown)}, which VLLM_API does not list"
    return kwargs


# ----------------------------------------------------------------------------- the stand-in
@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class RequestOutput:
    outputs: list[CompletionOutput]


class SamplingParams:
    def __init__(self, **kwargs) -> None:
        self.kwargs = _checked("vllm.SamplingParams", kwargs)


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

    def generate(self, **kwargs) -> list[RequestOutput]:
        kwargs = _checked("vllm.LLM.generate", kwargs)
        self.calls.append(("generate", kwargs))
        n = kwargs["sampling_params"].kwargs["n"]
        outputs = []
        for i, _prompt in enumerate(kwargs["prompts"]):
            # Completions out of order: the engine must sort them by index.
            completions = [
                CompletionOutput(
                    index=j,
                    text=f"  answer {i}.{j}\n",
                    token_ids=list(range(j + 2)),
                    finish_reason="length" if j % 2 else "stop",
                )
                for j in reversed(range(n))
            ]
            outputs.append(RequestOutput(outputs=completions))
        return outputs

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
    module.SamplingParams = SamplingParams
    LLM.built = []
    LLM.behaviour = Behaviour()
    monkeypatch.setitem(sys.modules, "vllm", module)
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
    _, cfg = compose(["experiment=mistral7b_sppo", f"cluster.colocate={str(colocate).lower()}"])
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


def test_max_model_len_none_is_left_to_vllm(fake_vllm, tokenizer_dir):
    _engine(tokenizer_dir, max_model_len=None)
    assert "max_model_len" not in LLM.built[0].kwargs


def test_request_mapping(fake_vllm, tokenizer_dir):
    engine = _engine(tokenizer_dir)
    engine.generate(["hi", "what is 2+2?"], SAMPLING)
    (_, call), = LLM.built[0].calls
    assert call["sampling_params"].kwargs == dict(n=3, temperature=0.7, top_p=0.9, max_tokens=16, seed=123)
    assert call["use_tqdm"] is False
    tok = engine.tokenizer
    for prompt, sent in zip(["hi", "what is 2+2?"], call["prompts"]):
        templated = format_prompt(tok, prompt)
        assert templated.startswith("<|user|>") and templated.endswith("<|assistant|>\n")
        assert sent == {"prompt_token_ids": tok(templated, add_special_tokens=False)["input_ids"]}


def test_prompts_are_cut_like_hf_engine(fake_vllm, tokenizer_dir):
    engine = _engine(tokenizer_dir, max_prompt_tokens=5)
    engine.generate(["a rather long prompt"], SAMPLING)
    (_, call), = LLM.built[0].calls
    assert len(call["prompts"][0]["prompt_token_ids"]) == 5


def test_response_mapping(fake_vllm, tokenizer_dir):
    rollouts = _engine(tokenizer_dir).generate(["hi", "there"], SAMPLING)
    assert len(rollouts) == 2
    second = rollouts[1]
    assert second.responses == ["answer 1.0", "answer 1.1", "answer 1.2"]  # stripped, by index
    assert second.num_tokens == [2, 3, 4]  # len(token_ids): EOS included
    assert second.truncated == [False, True, False]  # finish_reason == "length"


def test_greedy_sends_one_sample_and_repeats_it(fake_vllm, tokenizer_dir):
    greedy = SamplingConfig(num_samples=3, temperature=0.0, top_p=0.9, max_new_tokens=8, seed=0)
    (rollout,) = _engine(tokenizer_dir).generate(["hi"], greedy)
    (_, call), = LLM.built[0].calls
    assert call["sampling_params"].kwargs["n"] == 1 and call["sampling_params"].kwargs["top_p"] == 1.0
    assert rollout.responses == ["answer 0.0"] * 3


def test_no_prompts_no_call(fake_vllm, tokenizer_dir):
    engine = _engine(tokenizer_dir)
    assert engine.generate([], SAMPLING) == []
    assert LLM.built[0].calls == []


def test_load_weights_in_place(fake_vllm, tokenizer_dir):
    engine = _engine(tokenizer_dir)
    engine.load_weights(tokenizer_dir + "/")
    assert len(LLM.built) == 1  # no rebuild
    names = [c[0] if c[0] != "collective_rpc" else c[1] for c in LLM.built[0].calls]
    assert names == ["spo_load_checkpoint", "reset_prefix_cache"]
    rpc = LLM.built[0].calls[0][2]
    assert rpc["args"] == (tokenizer_dir + "/",) and rpc["timeout"] == engine.reload_timeout_s
    assert engine.path == tokenizer_dir + "/"


def test_load_weights_rebuilds_when_in_place_fails(fake_vllm, tokenizer_dir):
    engine = _engine(tokenizer_dir)
    LLM.behaviour.rpc = "raise"
    engine.load_weights(tokenizer_dir + "/")
    old, new = LLM.built
    assert old.shut_down and engine.llm is new
    assert new.kwargs == {**old.kwargs, "model": tokenizer_dir + "/"}


def test_load_weights_rebuilds_when_in_place_hangs(fake_vllm, tokenizer_dir):
    engine = _engine(tokenizer_dir, reload_timeout_s=1.0)
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
class HFModelLoader:
    """Stands in for a vLLM model: `load_weights(weights)` copies checkpoint-named tensors."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.calls = 0

    def load_weights(self, *, weights) -> set[str]:
        _checked("vllm.model_executor.models.llama.LlamaForCausalLM.load_weights", {"weights": weights})
        self.calls += 1
        params = dict(self.model.named_parameters())
        loaded = set()
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)
                loaded.add(name)
        return loaded


class FakeWorker(SpoWorkerExtension):
    """What SpoWorkerExtension uses of vLLM's GPU worker: get_model, rank, device."""

    def __init__(self, model: torch.nn.Module, rank: int = 0, device: str = "cpu") -> None:
        assert {"get_model", "rank", "device"} <= FIELDS["vllm.v1.worker.gpu_worker.Worker"]
        self.loader = HFModelLoader(model)
        self.rank, self.device = rank, torch.device(device)

    def get_model(self) -> HFModelLoader:
        return self.loader


def tiny_llama(seed: int):
    from types import SimpleNamespace

    from spo_ray.modeling import build_random_policy
    from tests.conftest import TINY_SPEC

    return build_random_policy(SimpleNamespace(**TINY_SPEC), seed=seed)[0]


def test_extension_names_cannot_clash_with_vllm_worker():
    names = [n for n in vars(SpoWorkerExtension) if not n.startswith("__")]
    assert names and all(n.startswith("spo_") for n in names)


def test_worker_extension_loads_a_checkpoint_in_place(tiny_policy):
    from spo_ray.modeling import load_policy

    worker = FakeWorker(tiny_llama(seed=99))
    count = worker.spo_load_checkpoint(tiny_policy)
    expected = load_policy(tiny_policy).state_dict()
    got = worker.loader.model.state_dict()
    assert count == len(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0)


class _LoopbackGroup:
    """One side of a sync group whose rank-0 sender is this test: broadcast fills the
    buffer with the next flattened bucket."""

    def __init__(self, flats: list[torch.Tensor]) -> None:
        self.flats = flats
        self.device = torch.device("cpu")
        self.closed = False

    def broadcast(self, tensor: torch.Tensor) -> None:
        tensor.copy_(self.flats.pop(0))

    def close(self) -> None:
        self.closed = True


def test_worker_extension_receives_a_broadcast(monkeypatch):
    from spo_ray.rollout import weight_sync

    source = tiny_llama(seed=1)
    plan = weight_sync.plan_for_module(source, "float32", bucket_bytes=4096)
    params = dict(source.named_parameters())
    flats = [torch.cat([params[m.name].detach().reshape(-1) for m in b]) for b in plan.buckets]
    joined = {}

    def create_sync_group(spec, rank, device):
        joined.update(spec=spec, rank=rank, device=device)
        return _LoopbackGroup(flats)

    monkeypatch.setattr(weight_sync, "create_sync_group", create_sync_group)
    worker = FakeWorker(tiny_llama(seed=2), rank=1)  # TP rank 1 of an engine at offset 3
    spec = SyncGroupSpec("127.0.0.1", 1234, 5, "gloo", 10.0)
    worker.spo_init_weight_sync(spec.to_dict(), 3)
    assert joined == dict(spec=spec, rank=4, device=torch.device("cpu"))
    assert worker.spo_receive_weights(plan.to_dict()) == plan.num_tensors
    assert worker.loader.calls == len(plan.buckets) > 1
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(worker.loader.model.state_dict()[name], tensor, rtol=0, atol=0)
    group = worker.spo_sync_group
    worker.spo_close_weight_sync()
    assert group.closed and worker.spo_sync_group is None
