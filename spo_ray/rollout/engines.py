"""Rollout engines that live for the whole run: reloaded with π_t, never rebuilt per iteration.

    RolloutEngines (driver)   starts cluster.rollout.num_actors `EngineActor`s once, with
                              cluster.rollout's CPUs/GPUs; `load`, `sleep`, `shutdown`
    EngineActor   (Ray actor) holds one PersistentEngine (HFEngine, VLLMEngine: rollout/base.py)
                              and the path of the policy it holds
    EngineClient  (in the stream's rollout tasks, which reserve nothing themselves, and in
                              the evaluation task) sends each batch to the engine with the
                              fewest batches in flight (`EngineLeases`)

Every `generate` names the policy it expects. An engine that holds another one — it was
restarted by Ray after a crash (it comes back with the policy it was first built from), or
a weight broadcast missed it — loads the named policy first. So a batch is never sampled
from the wrong π, whatever failed.

How π_{t+1} reaches the engines (`rollout.weight_sync`, spo_ray/rollout/weight_sync.py):

    storage  after training, the driver calls `load(iter_t/policy)`: each engine's
             `load_weights` reads the saved folder, in place (HF: into the same tensors;
             vLLM: through its worker extension)
    nccl     at the end of training the learner's rank 0 pushes the weights over a sync
             group (`push_weights`, called from learner/loop.py); the driver's `load` then
             reloads from storage only the engines that did not receive them

Colocated placement (`cluster.colocate: true`): the engines `sleep` while the learner trains
on the same GPUs; `load` wakes them with π_{t+1}.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import ray

from spo_ray.config import engine_dtype
from spo_ray.faults import maybe_fail
from spo_ray.rollout.base import PersistentEngine, Prompt, Rollout, SamplingConfig
from spo_ray.rollout.factory import make_engine

if TYPE_CHECKING:
    import torch

    from spo_ray.config import Config

log = logging.getLogger(__name__)


class EngineActor:
    """One rollout engine (a Ray actor). Ray restarts it when it dies and retries the call
    it was running (`max_restarts=-1, max_task_retries=-1`)."""

    def __init__(self, cfg: "Config", policy_path: str, engine_factory: Callable[["Config", str], PersistentEngine]) -> None:
        self.engine: PersistentEngine = engine_factory(cfg, policy_path)
        self.policy = policy_path
        self.asleep = False

    def state(self) -> dict:
        """What the engine holds: {"policy": path, "asleep": bool} (also: it is up)."""
        return {"policy": self.policy, "asleep": self.asleep}

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig, policy_path: str) -> list[Rollout]:
        self._hold(policy_path)
        rollouts = self.engine.generate(prompts, sampling)
        maybe_fail("engine_generate")  # fault injection (spo_ray/faults.py); a no-op unless asked for
        return rollouts

    def load(self, policy_path: str) -> dict:
        """Hold `policy_path` (awake). Returns how: "held" (it already did) or "storage"."""
        start = time.monotonic()
        how = "storage" if self._hold(policy_path) else "held"
        return {"how": how, "seconds": time.monotonic() - start}

    def sleep(self, level: int) -> None:
        """Free the accelerator for the learner (colocated placement); `load` wakes it."""
        self.engine.sleep(level)
        self.asleep = True

    def receive(self, spec: dict, rank_offset: int, plan: dict, policy_path: str) -> int:
        """Receive π_{t+1} from the learner's broadcast (`push_weights` on learner rank 0)."""
        from spo_ray.rollout.weight_sync import SyncGroupSpec, WeightPlan

        self.engine.init_weight_sync(SyncGroupSpec.from_dict(spec), rank_offset)
        try:
            count = self.engine.receive_weights(WeightPlan.from_dict(plan))
        finally:
            self.engine.close_weight_sync()
        self.policy = policy_path  # only after every bucket arrived: a partial sync is reloaded from storage
        return count

    def sync_ranks(self) -> int:
        """Ranks this engine takes in a sync group: its tensor-parallel workers."""
        return self.engine.sync_world_size

    def shutdown(self) -> None:
        """Stop the engine and the processes it started (vLLM: EngineCore and workers)
        before the actor goes. An actor that dies instead leaves that to the engine's
        watchdog (spo_ray/rollout/reaper.py)."""
        self.engine.shutdown()

    def _hold(self, policy_path: str) -> bool:
        if policy_path == self.policy and not self.asleep:
            return False
        self.engine.load_weights(policy_path)
        self.policy, self.asleep = policy_path, False
        return True


@ray.remote(num_cpus=0)
class EngineLeases:
    """Which actor (engine or judge) the next batch goes to: the one with the fewest batches
    in flight. A client acquires per batch and releases when the batch is back, so however
    many processes forward batches (tasks on reused workers, the evaluation), the actors
    stay evenly loaded. A forwarder killed during a call keeps its lease, so each new
    stream starts the counts over (`reset`); a release after that counts nothing below 0."""

    def __init__(self, n: int) -> None:
        self.counts = [0] * n

    def acquire(self) -> int:
        i = self.counts.index(min(self.counts))
        self.counts[i] += 1
        return i

    def release(self, i: int) -> None:
        self.counts[i] = max(0, self.counts[i] - 1)

    def reset(self) -> None:
        self.counts = [0] * len(self.counts)


def leased_call(actors: list, leases: Any, method: str, *args: Any) -> Any:
    """`actors[i].method(*args)` on the least loaded actor i, its lease held for the call."""
    i = ray.get(leases.acquire.remote())
    try:
        return ray.get(getattr(actors[i], method).remote(*args))
    finally:
        leases.release.remote(i)


class EngineClient:
    """The Engine of a rollout stage or evaluation when the engines are persistent actors."""

    def __init__(self, actors: list, leases: Any, policy_path: str) -> None:
        self.actors, self.leases = actors, leases
        self.policy_path = policy_path

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> list[Rollout]:
        return leased_call(self.actors, self.leases, "generate", list(prompts), sampling, self.policy_path)

    def load_weights(self, path: str) -> None:
        self.policy_path = path


class EngineClients:
    """A picklable engine factory for RolloutStage (`engine_factory(cfg, policy_path)`)."""

    def __init__(self, actors: list, leases: Any) -> None:
        self.actors, self.leases = actors, leases

    def __call__(self, cfg: "Config", policy_path: str) -> EngineClient:
        return EngineClient(self.actors, self.leases, policy_path)


class RolloutEngines:
    """The run's rollout engines (driver side). Picklable: Ray Train may build the stream
    (and so call `clients`) in another process."""

    def __init__(self, cfg: "Config", policy_path: str, engine_factory: Callable | None = None) -> None:
        c = cfg.cluster.rollout
        actor = ray.remote(EngineActor).options(
            num_cpus=c.num_cpus, num_gpus=c.num_gpus, max_restarts=-1, max_task_retries=-1
        )
        self.actors = [actor.remote(cfg, policy_path, engine_factory or make_engine) for _ in range(c.num_actors)]
        self.leases = EngineLeases.remote(len(self.actors))
        self.timeouts = cfg.run.timeouts

    def wait_started(self, iteration: int, cfg: "Config") -> None:
        """Every engine up (its constructor loaded the policy) within run.timeouts.actor_start_s."""
        from spo_ray.timeouts import pool_start_timeout

        ready, _ = ray.wait([a.state.remote() for a in self.actors], num_returns=len(self.actors), timeout=self.timeouts.actor_start_s)
        if len(ready) < len(self.actors):
            self.shutdown()
            raise pool_start_timeout(cfg, iteration)
        ray.get(ready)  # a constructor's error, if any

    def clients(self) -> EngineClients:
        """The engine factory of one stream or evaluation (the leases start over)."""
        ray.get(self.leases.reset.remote())
        return EngineClients(self.actors, self.leases)

    def load(self, policy_path: str) -> list[dict]:
        """Every engine holds `policy_path`, awake; what each did ("held"/"storage", seconds)."""
        refs = [a.load.remote(policy_path) for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeouts.weight_reload_s)
        if len(ready) < len(refs):
            raise TimeoutError(
                f"{len(refs) - len(ready)} of {len(refs)} rollout engines did not load {policy_path} within "
                f"run.timeouts.weight_reload_s={self.timeouts.weight_reload_s:g}s; check the EngineActor logs in the "
                "Ray dashboard and that the folder is readable from every node; the same command with the same "
                "run.dir resumes"
            )
        return ray.get(ready)

    def sleep(self, level: int = 2) -> None:
        ray.get([a.sleep.remote(level) for a in self.actors], timeout=self.timeouts.weight_reload_s)

    def sync_ranks(self) -> list[int]:
        return ray.get([a.sync_ranks.remote() for a in self.actors])

    def states(self) -> list[dict]:
        return ray.get([a.state.remote() for a in self.actors])

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Each engine stops its processes (bounded: a dead or hung actor is killed anyway),
        then the actors go."""
        ray.wait([a.shutdown.remote() for a in self.actors], num_returns=len(self.actors), timeout=timeout_s)
        for handle in (*self.actors, self.leases):
            ray.kill(handle)


# ----------------------------------------------------------------------------- nccl push
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def push_weights(
    module: "torch.nn.Module", cfg: "Config", engines: RolloutEngines, policy_path: str, rank: int, device: "torch.device", agree: Callable[[bool], bool]
) -> dict | None:
    """Every learner rank calls this after saving π_{t+1}: rank 0 opens a sync group with
    the engines and broadcasts the weights bucket by bucket (ZeRO-3 gathers need every
    rank). `agree(ok)` returns rank 0's `ok` on all ranks (whether the group came up), so
    no rank enters a gather the others skip. Returns rank 0's record (None elsewhere);
    a failure is recorded, not raised: the driver reloads those engines from storage."""
    from spo_ray.rollout.weight_sync import SyncGroupSpec, create_sync_group, plan_for_module, send_weights

    start = time.monotonic()
    plan = plan_for_module(module, engine_dtype(cfg), cfg.rollout.weight_sync_bucket_mb << 20)
    group, refs, error = None, [], None
    if rank == 0:
        try:
            ranks = engines.sync_ranks()
            spec = SyncGroupSpec(
                host=ray.util.get_node_ip_address(),
                port=free_port(),
                world_size=1 + sum(ranks),
                backend="nccl" if device.type == "cuda" else "gloo",
                timeout_s=cfg.run.timeouts.weight_reload_s,
            )
            offsets = [1 + sum(ranks[:i]) for i in range(len(ranks))]
            refs = [a.receive.remote(spec.to_dict(), off, plan.to_dict(), policy_path) for a, off in zip(engines.actors, offsets)]
            group = create_sync_group(spec, 0, device)
        except Exception as err:  # noqa: BLE001 - recorded; the storage path takes over
            error = err
    if not agree(group is not None):
        return None if rank else _record(start, plan, None, error)
    try:
        send_weights(module, plan, group)
    except Exception as err:  # noqa: BLE001
        error = err
    finally:
        if group is not None:
            group.close()
    if rank:
        return None
    counts = None
    try:
        counts = ray.get(refs, timeout=cfg.run.timeouts.weight_reload_s)
    except Exception as err:  # noqa: BLE001
        error = error or err
    return _record(start, plan, counts, error)


def _record(start: float, plan, counts: list[int] | None, error: BaseException | None) -> dict:
    record = {
        "method": "nccl",
        "seconds": round(time.monotonic() - start, 3),
        "tensors": plan.num_tensors,
        "bytes": plan.nbytes,
        "engines_received": counts,
        "error": None if error is None else f"{type(error).__name__}: {error}",
    }
    if error is not None:
        log.warning("weight broadcast to the rollout engines failed (%s); they reload from storage", record["error"])
    return record
