"""Where a run's actors go: the `cluster` section of the typed configuration (conf/cluster/),
its checks, and the placement the run prints at start."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from spo_ray.sections import Section, positive


@dataclass
class PoolConfig(Section):
    """One actor pool of the stream: its size and what each actor reserves."""

    num_actors: int = MISSING
    num_cpus: float = MISSING
    num_gpus: float = MISSING

    def check(self, name: str) -> None:
        positive(f"cluster.{name}.num_actors", self.num_actors)
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"cluster.{name}: num_cpus and num_gpus must be ≥ 0")


@dataclass
class LearnerPlacement(Section):
    num_workers: int = MISSING
    cpus_per_worker: float = MISSING
    gpus_per_worker: float = MISSING
    # Custom Ray resources each worker also reserves, e.g. {learner_slot: 1} with one
    # `learner_slot` per node puts one worker on each node.
    resources: dict[str, float] = MISSING


@dataclass
class ClusterConfig(Section):
    address: Optional[str] = None
    num_cpus: Optional[int] = None
    # Root of run dirs and sweeps (conf/config.yaml: run.dir, hydra.sweep.dir); on a cluster a
    # file system every node mounts. "." (this machine): the directory you launch from.
    storage: str = "."
    nodes: int = MISSING
    gpus_per_node: int = MISSING
    colocate: bool = MISSING
    rollout: PoolConfig = MISSING
    judge: PoolConfig = MISSING
    learner: LearnerPlacement = MISSING
    evaluate: PoolConfig = MISSING

    def __post_init__(self) -> None:
        for name in ("rollout", "judge", "evaluate"):
            getattr(self, name).check(name)
        positive("cluster.learner.num_workers", self.learner.num_workers)
        if "://" in self.storage:
            raise ValueError(
                f"cluster.storage={self.storage!r}: run dirs are written with plain file I/O; mount the "
                "bucket on every node (mountpoint-s3, gcsfuse) or use NFS, and give the mount path"
            )
        if self.nodes > 1 and not self.storage.startswith("/"):
            raise ValueError(
                f"cluster.storage={self.storage!r} with cluster.nodes={self.nodes}: every node writes to "
                "the run dir, so it must be an absolute path on storage all nodes mount (e.g. /mnt/shared/spo_ray)"
            )
        self.check_placement()

    def gpu_layout(self) -> dict[str, float]:
        """GPUs each stage reserves while an iteration streams: rollout, judge and learner
        run at the same time (the evaluation task runs after the learner has finished).
        The rollout engines hold theirs for the whole run (spo_ray/rollout/engines.py)."""
        return {
            "rollout": self.rollout.num_actors * self.rollout.num_gpus,
            "judge": self.judge.num_actors * self.judge.num_gpus,
            "learner": self.learner.num_workers * self.learner.gpus_per_worker,
        }

    def check_placement(self) -> None:
        """Fail before Ray starts where Ray could never schedule the stages (it would wait forever)."""
        total = self.nodes * self.gpus_per_node
        layout = self.gpu_layout()
        # Colocated: the judge runs first and releases its GPUs, then the learner trains while
        # the engines sleep; engines and learner share GPUs through fractional reservations.
        reserved = (
            layout["rollout"] + max(layout["judge"], layout["learner"]) if self.colocate else sum(layout.values())
        )
        if reserved > total + 1e-9:
            detail = ", ".join(f"{k} {v:g}" for k, v in layout.items())
            raise ValueError(
                f"cluster: the stages reserve {reserved:g} GPUs at once ({detail}) but "
                f"cluster.nodes × cluster.gpus_per_node = {total}; lower num_actors, num_gpus or "
                "learner.num_workers"
            )
        per_actor = {
            "rollout.num_gpus": self.rollout.num_gpus,
            "judge.num_gpus": self.judge.num_gpus,
            "learner.gpus_per_worker": self.learner.gpus_per_worker,
            "evaluate.num_gpus": self.evaluate.num_gpus,
        }
        for name, gpus in per_actor.items():
            if gpus > 1 and gpus != int(gpus):
                raise ValueError(f"cluster.{name}={gpus:g}: Ray takes a fraction below 1 or a whole number of GPUs")
            if gpus > self.gpus_per_node:
                raise ValueError(
                    f"cluster.{name}={gpus:g}: one actor cannot span machines with "
                    f"cluster.gpus_per_node={self.gpus_per_node} GPUs"
                )
        if layout["rollout"] + self.evaluate.num_actors * self.evaluate.num_gpus > total + 1e-9:
            raise ValueError(
                f"cluster.evaluate: {self.evaluate.num_actors}×{self.evaluate.num_gpus:g} GPUs next to the rollout "
                f"engines' {layout['rollout']:g} (held for the whole run) is more than the cluster has ({total})"
            )

    def placement(self) -> str:
        """What each actor of the run reserves, as one line (printed at the start of a run)."""
        pools = [
            ("rollout engines", self.rollout.num_actors, self.rollout.num_cpus, self.rollout.num_gpus),
            ("judge actors", self.judge.num_actors, self.judge.num_cpus, self.judge.num_gpus),
            ("learner workers", self.learner.num_workers, self.learner.cpus_per_worker, self.learner.gpus_per_worker),
            ("evaluation", self.evaluate.num_actors, self.evaluate.num_cpus, self.evaluate.num_gpus),
        ]
        where = "colocated: engines sleep while the learner trains" if self.colocate else "disjoint"
        return "; ".join(f"{n} {name} × ({cpus:g} CPU, {gpus:g} GPU)" for name, n, cpus, gpus in pools) + f" ({where})"

    def describe(self) -> str:
        """The placement as one line, e.g. for a log or a runbook."""
        pools = [
            f"rollout {self.rollout.num_actors}×{self.rollout.num_gpus:g}",
            f"judge {self.judge.num_actors}×{self.judge.num_gpus:g}",
            f"learner {self.learner.num_workers}×{self.learner.gpus_per_worker:g}",
        ]
        return (
            f"{self.nodes}×{self.gpus_per_node} GPUs; streaming: {', '.join(pools)} = "
            f"{sum(self.gpu_layout().values()):g} GPUs; then evaluate "
            f"{self.evaluate.num_actors}×{self.evaluate.num_gpus:g}; storage {self.storage}"
        )
