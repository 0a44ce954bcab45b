"""Moving π_{t+1} from the learner to the rollout engines: from storage, or by NCCL broadcast.

Two paths, one result (the engines hold the learner's new weights in the rollout dtype):

storage (the default, and the fallback of the other path)
    Learner rank 0 writes `iter_<t>/policy/` (an HF folder of safetensors, which the run
    directory keeps anyway); every engine then runs `Engine.load_weights(path)`, which reads
    the shards with `checkpoint_tensors`. It works on every placement, colocated or split,
    one node or many (the run dir is on storage every node mounts), and after any engine
    restart. Its cost is one write plus one read of the checkpoint per engine: for a 7B bf16
    policy 14 GB per engine, seconds from a local NVMe, minutes from NFS with 20 engines.

NCCL broadcast (split placement, many engines or slow shared storage)
    The learner's ZeRO-3 workers gather their parameter shards bucket by bucket
    (`deepspeed.zero.GatheredParameters`, a collective of the learner group), and rank 0
    broadcasts each bucket, cast to the rollout dtype and flattened, to every engine worker
    over a process group created for this purpose only (`create_sync_group`: its own TCP
    store and backend, a timeout, no use of the default group that DeepSpeed and vLLM
    already own). Engine workers unflatten each bucket and hand it to the model's
    `load_weights`, which shards it for tensor parallelism (see `spo_ray.rollout.vllm`).
    Every engine gets the weights at interconnect speed and at the same time; the
    checkpoint is still written for the run directory, but nobody waits to read it.
    Not for colocated placement: NCCL refuses two ranks of one group on the same GPU, and
    there the storage path (a local disk read) is cheap anyway.

Ranks of the sync group: 0 is learner rank 0; engine i's worker of tensor-parallel rank r
is 1 + Σ_{j<i} tp_j + r. World size: 1 + Σ tp_i. The bucket plan (`WeightPlan`) is a
small JSON-able value computed on the learner and handed to the engines as a control
message; tensors only travel through the group.

A sequence of one sync (driver side, all calls issued before any is awaited):
    group setup, once:  learner rank 0 `create_sync_group(spec, 0, device)` ‖
                        each engine `init_weight_sync(spec, rank_offset)`
    every iteration:    learner workers `send_weights(module, plan, group or None)` ‖
                        each engine `receive_weights(plan)`
A failed or timed-out sync leaves the engines with mixed weights: reload from storage.
"""

from __future__ import annotations

import datetime
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
import torch.distributed as dist

from spo_ray.dtypes import TORCH_DTYPES, torch_dtype

log = logging.getLogger(__name__)

BACKENDS = ("nccl", "gloo")  # gloo: CPU tensors, for tests and CPU-only runs
# Only torch (and spo_ray.dtypes) is imported here: learner workers and vLLM worker processes both load this module.
# Prefixes that wrappers add to parameter names: DeepSpeed/DDP (module.), torch.compile
# (_orig_mod.), activation checkpoint wrappers (_checkpoint_wrapped_module.).
_WRAPPER_SEGMENTS = ("module", "_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class TensorMeta:
    """One parameter as the engines will receive it: its HF checkpoint name and full shape."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class WeightPlan:
    """The buckets of one broadcast, in order; every tensor of a bucket has `dtype`."""

    dtype: str
    buckets: tuple[tuple[TensorMeta, ...], ...]

    def __post_init__(self) -> None:
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"WeightPlan.dtype={self.dtype!r} is not one of {', '.join(TORCH_DTYPES)}")

    @property
    def num_tensors(self) -> int:
        return sum(len(b) for b in self.buckets)

    @property
    def nbytes(self) -> int:
        size = torch.empty(0, dtype=torch_dtype(self.dtype)).element_size()
        return sum(m.numel for b in self.buckets for m in b) * size

    def to_dict(self) -> dict[str, Any]:
        """Builtins only: it crosses Ray and vLLM's RPC, which need not unpickle our classes."""
        return {"dtype": self.dtype, "buckets": [[[m.name, list(m.shape)] for m in b] for b in self.buckets]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WeightPlan":
        buckets = tuple(tuple(TensorMeta(name, tuple(int(d) for d in shape)) for name, shape in b) for b in data["buckets"])
        return cls(dtype=data["dtype"], buckets=buckets)


def hf_parameter_name(name: str) -> str:
    """The checkpoint name of a parameter seen through wrappers: `module.model.embed_tokens.weight`
    (DeepSpeed engine) → `model.embed_tokens.weight` (what `save_pretrained` writes)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The unpartitioned shape: ZeRO-3 leaves an empty local tensor and keeps it in `ds_shape`."""
    return tuple(int(d) for d in getattr(param, "ds_shape", param.shape))


def sync_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(checkpoint name, parameter) in registration order; tied weights appear once, under
    the first name (`named_parameters` drops the duplicates), which is also the name that
    `save_pretrained` keeps and vLLM's `load_weights` expects."""
    out, seen = [], set()
    for name, param in module.named_parameters():
        hf_name = hf_parameter_name(name)
        if hf_name in seen:
            raise ValueError(f"two parameters map to the checkpoint name {hf_name!r} ({name})")
        seen.add(hf_name)
        out.append((hf_name, param))
    return out


def plan_buckets(metas: Sequence[TensorMeta], dtype: str, bucket_bytes: int) -> WeightPlan:
    """Greedy, order-preserving buckets of at most `bucket_bytes` each; a tensor larger than
    that travels alone (tensors are never split, so the receiver loads whole tensors)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    size = torch.empty(0, dtype=torch_dtype(dtype)).element_size()
    buckets: list[tuple[TensorMeta, ...]] = []
    current: list[TensorMeta] = []
    used = 0
    for meta in metas:
        nbytes = meta.numel * size
        if current and used + nbytes > bucket_bytes:
            buckets.append(tuple(current))
            current, used = [], 0
        current.append(meta)
        used += nbytes
    if current:
        buckets.append(tuple(current))
    return WeightPlan(dtype=dtype, buckets=tuple(buckets))


def plan_for_module(module: torch.nn.Module, dtype: str, bucket_bytes: int) -> WeightPlan:
    """The plan for a (possibly ZeRO-3 partitioned) model; the same on every learner rank."""
    return plan_buckets([TensorMeta(n, full_shape(p)) for n, p in sync_parameters(module)], dtype, bucket_bytes)


# ----------------------------------------------------------------------------- the group
@dataclass(frozen=True)
class SyncGroupSpec:
    """Where the sync group meets: learner rank 0 hosts the TCP store at host:port."""

    host: str
    port: int
    world_size: int
    backend: str
    timeout_s: float

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"sync backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.world_size < 2:
            raise ValueError(f"a sync group needs the learner and ≥ 1 engine worker, got world_size={self.world_size}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "world_size": self.world_size, "backend": self.backend, "timeout_s": self.timeout_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SyncGroupSpec":
        return cls(**data)


class SyncGroup:
    """A process group of its own (not torch.distributed's default group): a TCP store plus
    a ProcessGroupNCCL (GPU tensors) or ProcessGroupGloo (CPU tensors), with a timeout."""

    def __init__(self, spec: SyncGroupSpec, rank: int, device: torch.device | str) -> None:
        if not 0 <= rank < spec.world_size:
            raise ValueError(f"rank {rank} is outside the sync group of {spec.world_size}")
        self.spec, self.rank, self.device = spec, rank, torch.device(device)
        self.timeout = datetime.timedelta(seconds=spec.timeout_s)
        # Every rank blocks here until all world_size ranks have connected (or the timeout).
        store = dist.TCPStore(spec.host, spec.port, spec.world_size, is_master=rank == 0, timeout=self.timeout)
        self._store = dist.PrefixStore("spo_ray_weight_sync", store)
        if spec.backend == "nccl":
            if self.device.type != "cuda":
                raise ValueError(f"the nccl sync backend needs a CUDA device, got {self.device}")
            torch.cuda.set_device(self.device)
            self._pg = dist.ProcessGroupNCCL(self._store, rank, spec.world_size, self.timeout)
        else:
            self._pg = dist.ProcessGroupGloo(self._store, rank, spec.world_size, self.timeout)

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        self._pg.broadcast([tensor], opts).wait(self.timeout)

    def close(self) -> None:
        shutdown = getattr(self._pg, "shutdown", None) or getattr(self._pg, "_shutdown", None)
        if shutdown is not None:
            shutdown()


def create_sync_group(spec: SyncGroupSpec, rank: int, device: torch.device | str) -> SyncGroup:
    """Join the sync group as `rank` (0: learner rank 0, the store's host)."""
    log.info("joining weight-sync group %s:%d as rank %d/%d (%s)", spec.host, spec.port, rank, spec.world_size, spec.backend)
    return SyncGroup(spec, rank, device)


# ----------------------------------------------------------------------------- send / receive
def _gathered(params: Sequence[torch.nn.Parameter]) -> ContextManager:
    """ZeRO-3: all-gather the bucket's shards (every learner rank must enter); else no-op."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
    return nullcontext()


def send_weights(module: torch.nn.Module, plan: WeightPlan, group: SyncGroup | None) -> None:
    """Run on every learner worker (the ZeRO-3 gather is collective); rank 0 passes its
    `SyncGroup` and broadcasts, the others pass None. Bucket by bucket, so at most one
    bucket of full parameters is resident beyond the shards. A failed broadcast stops the
    broadcasting, not the gathering (the other ranks are in the same collectives), and
    is raised at the end."""
    params = dict(sync_parameters(module))
    missing = [m.name for b in plan.buckets for m in b if m.name not in params]
    if missing:
        raise KeyError(f"the plan names parameters this module lacks: {missing[:5]}")
    dtype = torch_dtype(plan.dtype)
    error: Exception | None = None
    for bucket in plan.buckets:
        tensors = [params[m.name] for m in bucket]
        with _gathered(tensors), torch.no_grad():
            if group is None or error is not None:
                continue
            try:
                for meta, t in zip(bucket, tensors):
                    if tuple(t.shape) != meta.shape:
                        raise ValueError(f"{meta.name}: shape {tuple(t.shape)} after gathering, plan says {meta.shape}")
                flat = torch.cat([t.detach().reshape(-1).to(device=group.device, dtype=dtype) for t in tensors])
                group.broadcast(flat)
            except Exception as err:  # noqa: BLE001 - raised after the loop: the other ranks gather every bucket
                error = err
    if error is not None:
        raise error


def unflatten_bucket(flat: torch.Tensor, bucket: Sequence[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """Views of one received bucket, named and shaped as the plan says."""
    sizes = [m.numel for m in bucket]
    if flat.numel() != sum(sizes):
        raise ValueError(f"bucket holds {flat.numel()} elements, its plan {sum(sizes)}")
    return [(m.name, part.view(m.shape)) for m, part in zip(bucket, flat.split(sizes))]


def received_tensors(plan: WeightPlan, group: SyncGroup) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of the broadcast, in plan order; each bucket is
    received from rank 0 when the consumer reaches it, so one bucket is resident at a time
    (more only if the consumer keeps references, as vLLM's layer-wise reload does until a
    layer is complete)."""
    dtype = torch_dtype(plan.dtype)
    for bucket in plan.buckets:
        flat = torch.empty(sum(m.numel for m in bucket), dtype=dtype, device=group.device)
        group.broadcast(flat)
        yield from unflatten_bucket(flat, bucket)


def receive_weights(
    plan: WeightPlan, group: SyncGroup, load: Callable[[Iterator[tuple[str, torch.Tensor]]], object]
) -> int:
    """Receive every bucket from rank 0 and pass the tensors to `load` as one iterator (a
    model's `load_weights`, or vLLM's `reload_weights`); returns the number of tensors
    received. Buckets `load` left unread are still received, so the sender never waits."""
    tensors = received_tensors(plan, group)
    count = 0

    def counted() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal count
        for item in tensors:
            count += 1
            yield item

    load(counted())
    for _ in counted():  # drain: the broadcast has a fixed number of buckets
        pass
    return count


# ----------------------------------------------------------------------------- storage
def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors shards of an HF folder (the index's order when it has one)."""
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no safetensors weights in {folder}: the learner saves policies with save_policy "
            "(safetensors); convert other checkpoints or reload the engine from scratch"
        )
    return files


def checkpoint_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for every tensor of the checkpoint, one shard open at a time."""
    from safetensors import safe_open

    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)

