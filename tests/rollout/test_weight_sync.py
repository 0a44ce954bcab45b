"""Weight sync on CPU: names, buckets, the ZeRO-3 gather order, checkpoint reading, and a
real broadcast between two processes over gloo (standing in for NCCL: same code path,
`SyncGroup` only swaps ProcessGroupNCCL for ProcessGroupGloo)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import types
from contextlib import contextmanager

import pytest
import torch
import torch.multiprocessing as mp

from spo_ray.rollout.weight_sync import (
    SyncGroup,
    SyncGroupSpec,
    TensorMeta,
    WeightPlan,
    checkpoint_files,
    checkpoint_tensors,
    full_shape,
    hf_parameter_name,
    plan_buckets,
    plan_for_module,
    send_weights,
    sync_parameters,
    unflatten_bucket,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_llama(seed: int, tie: bool = False):
    from types import SimpleNamespace

    from spo_ray.modeling import build_random_policy
    from tests.conftest import TINY_SPEC

    model = build_random_policy(SimpleNamespace(**TINY_SPEC), seed=seed)[0]
    if tie:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    return model


@pytest.mark.parametrize(
    "wrapped, plain",
    [
        ("module.model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
        ("_orig_mod.module.lm_head.weight", "lm_head.weight"),
        ("model.layers.3._checkpoint_wrapped_module.self_attn.q_proj.weight", "model.layers.3.self_attn.q_proj.weight"),
        ("model.norm.weight", "model.norm.weight"),
    ],
)
def test_hf_parameter_name(wrapped, plain):
    assert hf_parameter_name(wrapped) == plain


def test_sync_names_are_the_checkpoint_names(tiny_policy):
    from spo_ray.modeling import load_policy

    model = load_policy(tiny_policy)
    wrapper = torch.nn.Module()
    wrapper.module = model  # as DeepSpeed's engine holds it
    names = [n for n, _ in sync_parameters(wrapper)]
    assert names == [n for n, _ in model.named_parameters()]
    assert set(names) == {n for n, _ in checkpoint_tensors(tiny_policy)}


def test_tied_weights_are_sent_once():
    names = [n for n, _ in sync_parameters(tiny_llama(0, tie=True))]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names


def test_buckets_keep_order_and_size():
    metas = [TensorMeta(f"t{i}", shape) for i, shape in enumerate([(4, 4), (8,), (100, 10), (3, 3), (2,), (16,)])]
    plan = plan_buckets(metas, "bfloat16", bucket_bytes=64)  # 32 bf16 elements per bucket
    assert [m for b in plan.buckets for m in b] == metas
    assert [[m.name for m in b] for b in plan.buckets] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    for bucket in plan.buckets:
        assert len(bucket) == 1 or sum(m.numel for m in bucket) * 2 <= 64
    assert plan.num_tensors == 6 and plan.nbytes == 2 * (16 + 8 + 1000 + 9 + 2 + 16)
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(metas, "bfloat16", bucket_bytes=0)
    with pytest.raises(ValueError, match="dtype"):
        plan_buckets(metas, "int8", bucket_bytes=64)


def test_plan_travels_as_json():
    plan = plan_buckets([TensorMeta("a.weight", (2, 3)), TensorMeta("b.bias", (3,))], "float16", 8)
    assert WeightPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_zero3_shapes_come_from_ds_shape():
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.empty(0))  # a ZeRO-3 shard holder
    module.weight.ds_shape = torch.Size([4, 8])
    module.weight.ds_id = 0
    assert full_shape(module.weight) == (4, 8)
    assert plan_for_module(module, "bfloat16", 1 << 20).buckets == ((TensorMeta("weight", (4, 8)),),)


def test_unflatten_checks_the_size():
    bucket = (TensorMeta("a", (2, 2)), TensorMeta("b", (3,)))
    parts = unflatten_bucket(torch.arange(7.0), bucket)
    assert [(n, tuple(t.shape)) for n, t in parts] == [("a", (2, 2)), ("b", (3,))]
    assert parts[1][1].tolist() == [4.0, 5.0, 6.0]
    with pytest.raises(ValueError, match="6 elements"):
        unflatten_bucket(torch.arange(6.0), bucket)


class _RecordingGroup:
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.sent: list[torch.Tensor] = []

    def broadcast(self, tensor: torch.Tensor) -> None:
        self.sent.append(tensor.clone())


@contextmanager
def _fake_deepspeed(monkeypatch, full: dict):
    """deepspeed.zero.GatheredParameters stand-in: fills the shards while inside."""
    gathered: list[list[str]] = []
    names = {id(p): n for n, p in full.items()}

    @contextmanager
    def gathered_parameters(params, modifier_rank=None):
        assert modifier_rank is None  # read-only gather
        gathered.append([names[id(p)] for p in params])
        for p in params:
            p.data = full[names[id(p)]].full.clone()
        yield
        for p in params:
            p.data = torch.empty(0)

    module = types.SimpleNamespace(zero=types.SimpleNamespace(GatheredParameters=gathered_parameters))
    monkeypatch.setitem(sys.modules, "deepspeed", module)
    yield gathered


@pytest.mark.parametrize("rank0", [True, False])
def test_send_gathers_bucket_by_bucket_on_every_rank(monkeypatch, rank0):
    torch.manual_seed(0)
    module = torch.nn.Module()
    shapes = {"a": (4, 4), "b": (8,), "c": (6, 2)}
    params = {}
    for name, shape in shapes.items():
        p = torch.nn.Parameter(torch.empty(0))
        p.ds_id, p.ds_shape, p.full = len(params), torch.Size(shape), torch.randn(shape)
        setattr(module, name, p)
        params[name] = p
    plan = plan_for_module(module, "bfloat16", bucket_bytes=48)  # a+b: 24 elements; c alone
    group = _RecordingGroup() if rank0 else None
    with _fake_deepspeed(monkeypatch, params) as gathered:
        send_weights(module, plan, group)
    assert gathered == [["a", "b"], ["c"]]  # every rank takes part in every gather
    if rank0:
        assert [t.dtype for t in group.sent] == [torch.bfloat16] * 2
        expected = torch.cat([params["a"].full.reshape(-1), params["b"].full]).to(torch.bfloat16)
        torch.testing.assert_close(group.sent[0], expected, rtol=0, atol=0)
        assert all(p.numel() == 0 for p in params.values())  # shards released again


def test_a_failed_broadcast_still_takes_part_in_every_gather(monkeypatch):
    """Rank 0's broadcast fails at the first bucket: it must still enter the later ZeRO-3
    gathers (the other learner ranks are waiting in them), then raise."""
    module, params = torch.nn.Module(), {}
    for name, shape in {"a": (4, 4), "b": (8,), "c": (6, 2)}.items():
        p = torch.nn.Parameter(torch.empty(0))
        p.ds_id, p.ds_shape, p.full = len(params), torch.Size(shape), torch.zeros(shape)
        setattr(module, name, p)
        params[name] = p

    class BrokenGroup(_RecordingGroup):
        def broadcast(self, tensor: torch.Tensor) -> None:
            raise RuntimeError("peer gone")

    plan = plan_for_module(module, "float32", bucket_bytes=16)  # one tensor per bucket
    with _fake_deepspeed(monkeypatch, params) as gathered, pytest.raises(RuntimeError, match="peer gone"):
        send_weights(module, plan, BrokenGroup())
    assert gathered == [["a"], ["b"], ["c"]]


def test_send_refuses_a_plan_for_another_model():
    plan = WeightPlan("float32", ((TensorMeta("not.there", (1,)),),))
    with pytest.raises(KeyError, match="not.there"):
        send_weights(torch.nn.Linear(1, 1), plan, _RecordingGroup())


def test_checkpoint_tensors_and_missing_weights(tiny_policy, tmp_path):
    from spo_ray.modeling import load_policy

    state = load_policy(tiny_policy).state_dict()
    read = dict(checkpoint_tensors(tiny_policy))
    assert read.keys() == state.keys()
    torch.testing.assert_close(read["lm_head.weight"], state["lm_head.weight"], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        checkpoint_files(tmp_path)


def test_spec_validation():
    with pytest.raises(ValueError, match="backend"):
        SyncGroupSpec("127.0.0.1", 1, 2, "mpi", 10)
    with pytest.raises(ValueError, match="world_size"):
        SyncGroupSpec("127.0.0.1", 1, 1, "gloo", 10)


def test_group_setup_times_out_when_a_rank_never_joins():
    spec = SyncGroupSpec("127.0.0.1", _free_port(), world_size=2, backend="gloo", timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(Exception):  # torch's DistStoreError/RuntimeError: the peer never came
        SyncGroup(spec, rank=0, device="cpu")
    assert time.monotonic() - started < 30


# ----------------------------------------------------------------------------- two processes
# The children import torch and weight_sync only (no transformers), to start fast.
class _TinyNet(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(64, 16)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3))
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 64, bias=False)


def _learner(spec: dict, plan_path: str, result_path: str) -> None:
    from spo_ray.rollout.weight_sync import create_sync_group

    model = _TinyNet(seed=1)
    plan = plan_for_module(model, "float32", bucket_bytes=2048)  # several buckets
    group = create_sync_group(SyncGroupSpec.from_dict(spec), rank=0, device="cpu")
    # The plan reaches engines as a control message (through Ray); here through a file.
    with open(plan_path + ".tmp", "w") as f:
        json.dump(plan.to_dict(), f)
    os.replace(plan_path + ".tmp", plan_path)
    send_weights(model, plan, group)
    group.close()


def _engine(spec: dict, plan_path: str, result_path: str) -> None:
    from spo_ray.rollout.weight_sync import create_sync_group, receive_weights

    model = _TinyNet(seed=2)
    params = dict(model.named_parameters())
    loads = []

    def load_weights(weights) -> None:  # what the vLLM model's load_weights does, unsharded
        weights = list(weights)  # one iterator over every bucket, received as it is read
        loads.append([n for n, _ in weights])
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)

    group = create_sync_group(SyncGroupSpec.from_dict(spec), rank=1, device="cpu")
    while not os.path.exists(plan_path):
        time.sleep(0.05)
    with open(plan_path) as f:
        plan = WeightPlan.from_dict(json.load(f))
    count = receive_weights(plan, group, load_weights)
    group.close()
    torch.save({"count": count, "loads": loads, "state": model.state_dict()}, result_path)


def _run(role: str, spec: dict, plan_path: str, result_path: str) -> None:
    torch.set_num_threads(1)
    (_learner if role == "learner" else _engine)(spec, plan_path, result_path)


def test_gloo_broadcast_between_two_processes(tmp_path):
    spec = SyncGroupSpec("127.0.0.1", _free_port(), world_size=2, backend="gloo", timeout_s=120).to_dict()
    plan_path, result = str(tmp_path / "plan.json"), str(tmp_path / "received.pt")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_run, args=(role, spec, plan_path, result)) for role in ("learner", "engine")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0, 0]
    got = torch.load(result)
    expected = _TinyNet(seed=1).state_dict()
    plan = WeightPlan.from_dict(json.loads(open(plan_path).read()))
    assert got["count"] == len(expected) and len(plan.buckets) > 1
    assert got["loads"] == [[m.name for b in plan.buckets for m in b]]  # one load call, in plan order
    for name, tensor in expected.items():
        torch.testing.assert_close(got["state"][name], tensor, rtol=0, atol=0)
