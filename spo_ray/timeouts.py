"""Every remote wait of a run has a timeout from `run.timeouts` (conf/config.yaml); here
they are handed to Ray, and a timeout is turned into an error that names the stage, the
actor and what to check, and says that the same command with the same `run.dir` resumes.

    run.timeouts.stream_no_progress_s   Ray Data: no row moved          (train.connect_ray)
    run.timeouts.actor_start_s          rollout engines, judge pool up  (RolloutEngines.wait_started,
                                                                     DataContext.wait_for_min_actors_s)
    run.timeouts.trainer_start_s        Ray Train workers placed        (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)
    run.timeouts.weight_reload_s        engines loading π_{t+1}         (RolloutEngines.load, VLLMEngine)
    run.timeouts.eval_s                 the evaluation, the tournament   (train.evaluate, tournament; get_within)
    run.timeouts.shared_fs_s            a file rank 0 listed, elsewhere (learner.resume.SharedView)
    serve.reconfigure_timeout_s         Serve loading π_t               (serve.serve_policy)

The knobs are Ray 2.60's; tests/test_timeouts.py runs each start timeout against a real
local Ray, so a Ray upgrade that renames one fails there rather than hanging a run.
"""

from __future__ import annotations

import os

import ray

from spo_ray.config import Config
from spo_ray.placement import PoolConfig

# Ray Train V2 reads this in its controller (it forwards the driver's value); its default is 60 s.
TRAINER_START_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# The texts Ray 2.60 raises on these timeouts (ActorPoolMapOperator.start,
# WorkerGroupStartupTimeoutError); they reach the driver inside other errors' text.
_ACTOR_START_TEXT = "Timed out while starting actors"
_TRAINER_START_TEXT = "worker group startup timed out"
_RESUME = "then start the same command with the same run.dir: the run resumes after its last finished stage"


def apply_stream_timeouts(ds: ray.data.Dataset, cfg: Config) -> ray.data.Dataset:
    """The stream's pool actors must be up (constructor done) within run.timeouts.actor_start_s.

    Without it (Ray Data's default, -1) a pool whose actors can never be placed — a GPU
    that is not there, a node that is gone — waits until the no-progress timeout, or forever.
    """
    ds.context.wait_for_min_actors_s = cfg.run.timeouts.actor_start_s
    return ds


def trainer_start_env(cfg: Config) -> None:
    """Ray Train's worker-group start timeout for this driver's trainers (a process-wide
    environment variable is the only knob Ray Train V2 has for it)."""
    os.environ[TRAINER_START_ENV] = f"{cfg.run.timeouts.trainer_start_s:g}"


def _pool_shortfall(name: str, pool: PoolConfig) -> str | None:
    """Why the pool could never start (None: it could). Ray Data waits for all `num_actors`
    of a fixed-size pool, so not only each actor but the whole pool must fit in the cluster."""
    total = ray.cluster_resources()
    for resource, each in (("CPU", pool.num_cpus), ("GPU", pool.num_gpus)):
        has = total.get(resource, 0)
        if each > has:
            return f"each {name} actor asks for {each:g} {resource} but the whole cluster has {has:g}"
        if pool.num_actors * each > has + 1e-9:
            return (
                f"the {pool.num_actors} {name} actors ask for {pool.num_actors} × {each:g} = "
                f"{pool.num_actors * each:g} {resource} together but the whole cluster has {has:g}"
            )
    return None


def explain_timeout(err: BaseException, cfg: Config, iteration: int, engines: bool = False, judges: bool = False) -> TimeoutError | None:
    """A TimeoutError naming what did not start in time, when `err` is one of Ray's start
    timeouts (it may be nested in a Ray Train or Ray Data error); None for any other error.
    `engines` / `judges`: the stream ran on the run's rollout engines / judge pool, so its
    rollout / judge stage was tasks, with no actors to start (the pools' own starts are
    `pool_start_timeout` and `judge_pool_start_timeout`)."""
    text = f"{err!r} {err}"
    cause = err.__cause__
    while cause is not None:
        text += f" {cause}"
        cause = cause.__cause__
    c, t = cfg.cluster, cfg.run.timeouts
    if _ACTOR_START_TEXT in text:
        pools = {}
        if not engines:
            pools["rollout"] = ("RolloutStage", c.rollout, f"the policy ({cfg.rollout.engine} engine)")
        if not judges:
            pools["judge"] = ("JudgeStage", c.judge, f"the {cfg.judge.name} judge")
        return _start_timeout(cfg, iteration, pools) if pools else None
    if _TRAINER_START_TEXT in text:
        l = c.learner
        return TimeoutError(
            f"iteration {iteration}: the learner's Ray Train workers (RayTrainWorker × {l.num_workers}, "
            f"{l.cpus_per_worker:g} CPU + {l.gpus_per_worker:g} GPU{''.join(f' + {n:g} {k}' for k, n in l.resources.items())} "
            f"each) were not placed within "
            f"run.timeouts.trainer_start_s={t.trainer_start_s:g}s. Check `ray status` for free resources "
            f"(the cluster has {_resources()}; the stream's pools hold some while they run), lower "
            f"cluster.learner.* or raise run.timeouts.trainer_start_s; {_RESUME}"
        )
    return None


def pool_start_timeout(cfg: Config, iteration: int) -> TimeoutError:
    """The rollout engines (spo_ray/rollout/engines.py) did not start within actor_start_s."""
    return _start_timeout(cfg, iteration, {"rollout": ("EngineActor", cfg.cluster.rollout, f"the policy ({cfg.rollout.engine} engine)")})


def judge_pool_start_timeout(cfg: Config, iteration: int) -> TimeoutError:
    """The run's judges (spo_ray/judge/pool.py) did not start within actor_start_s."""
    return _start_timeout(cfg, iteration, {"judge": ("JudgeActor", cfg.cluster.judge, f"the {cfg.judge.name} judge")})


def _start_timeout(cfg: Config, iteration: int, pools: dict) -> TimeoutError:
    """Which of `pools` (name → (actor class, PoolConfig, what its constructor loads))
    could not start, and why, as far as the cluster's resources tell."""
    t = cfg.run.timeouts
    named = {k: why for k, (actor, p, _) in pools.items() if (why := _pool_shortfall(actor, p))}
    suspects = {k: v for k, v in pools.items() if k in named} or pools
    which = " or ".join(f"the {k} pool ({actor} × {p.num_actors}, {p.num_cpus:g} CPU + {p.num_gpus:g} GPU each)" for k, (actor, p, _) in suspects.items())
    why = "; ".join(named.values()) or (
        "the actors were not placed (resources taken) or their constructor, which loads "
        + " / ".join(load for _, _, load in suspects.values())
        + ", did not finish"
    )
    return TimeoutError(
        f"iteration {iteration}: {which} did not start within run.timeouts.actor_start_s={t.actor_start_s:g}s: "
        f"{why}. Check `ray status` (pending actors, missing resources) and the actor's log in the Ray "
        f"dashboard; lower cluster.<pool>.num_actors/num_cpus/num_gpus or raise run.timeouts.actor_start_s; {_RESUME}"
    )


def _resources() -> str:
    total = ray.cluster_resources()
    return ", ".join(f"{total.get(k, 0):g} {k}" for k in ("CPU", "GPU"))


def get_within(ref: ray.ObjectRef, timeout_s: float, what: str, hint: str = "") -> object:
    """`ray.get(ref)` within `timeout_s`; past it the task is cancelled and a TimeoutError
    names `what`, the knob (run.timeouts.eval_s) and that the same run.dir resumes."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise TimeoutError(
            f"{what} took longer than run.timeouts.eval_s={timeout_s}s; {hint}raise the timeout and rerun with the same run.dir"
        ) from None
