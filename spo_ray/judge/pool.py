"""Judges that live for the whole run: loaded once, used by every stream, evaluation and tournament.

    JudgePool   (driver)    starts cluster.judge.num_actors `JudgeActor`s once, with
                            cluster.judge's CPUs/GPUs; `clients`, `shutdown`
    JudgeActor  (Ray actor) holds one judge (`build_judge(cfg.judge)`: PairRM, the
                            reference judge's embedding model, …)
    JudgeClient (in the stream's judge tasks, which reserve nothing themselves, and in
                            the evaluation and tournament tasks) is a `Judge`: each call goes
                            to the actor with the fewest batches in flight (`EngineLeases`)

Without the pool every stream started its judge actors again, and each loaded the judge's
model (seconds on CPU, tens of seconds for PairRM on a GPU node) after the learner asked
for data; the evaluation and the tournament loaded the training judge once more each.

Ray restarts an actor that dies and retries the call it was running (`max_restarts=-1,
max_task_retries=-1`): a judge call is a pure function of its arguments (the references
travel with it), so a retried batch gives the same logits. Colocated placement
(`cluster.colocate`) keeps the per-stream judges instead, whose GPU memory goes with the
stream before the learner trains on the same GPUs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import ray

from spo_ray.judge import build_judge
from spo_ray.rollout.engines import EngineLeases, leased_call

if TYPE_CHECKING:
    import torch

    from spo_ray.config import Config, JudgeConfig


class JudgeActor:
    """One judge (a Ray actor)."""

    def __init__(self, cfg: "JudgeConfig", device: str, judge_factory: Callable = build_judge) -> None:
        self.judge = judge_factory(cfg, device=device)
        self.references: dict | None = None

    def needs_references(self) -> bool:
        return bool(getattr(self.judge, "needs_references", False))

    def batch_pairwise_logits(
        self, prompts: Sequence[str], responses: Sequence[Sequence[str]], references: Mapping[str, str] | None
    ) -> list["torch.Tensor"]:
        if references is not None and references != self.references:  # the same table: keep its cached embeddings
            self.judge.set_references(references)
            self.references = dict(references)
        return self.judge.batch_pairwise_logits(prompts, responses)


class JudgeClient:
    """A `Judge` whose work is done by the run's judge actors. A reference-guided judge's
    references are kept here and sent with each call (only those of its prompts)."""

    def __init__(self, actors: list, leases: Any, needs_references: bool) -> None:
        self.actors, self.leases = actors, leases
        self.needs_references = needs_references
        self.references: dict[str, str] = {}

    def set_references(self, references: Mapping[str, str]) -> None:
        self.references = dict(references)

    def batch_pairwise_logits(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list["torch.Tensor"]:
        refs = {p: self.references.get(p) for p in prompts} if self.needs_references else None
        return leased_call(self.actors, self.leases, "batch_pairwise_logits", list(prompts), [list(r) for r in responses], refs)

    def pairwise_logits(self, prompt: str, responses: Sequence[str]) -> "torch.Tensor":
        return self.batch_pairwise_logits([prompt], [responses])[0]


class JudgeClients:
    """A picklable judge factory (`judge_factory(cfg, device=...)`, as `build_judge`) that
    hands out clients of the run's judge actors; the judge config given is the pool's."""

    def __init__(self, actors: list, leases: Any, needs_references: bool) -> None:
        self.actors, self.leases, self.needs_references = actors, leases, needs_references

    def __call__(self, cfg: "JudgeConfig | None" = None, device: str = "cpu") -> JudgeClient:
        return JudgeClient(self.actors, self.leases, self.needs_references)


class JudgePool:
    """The run's training judges (driver side); picklable, like `RolloutEngines`.
    `judge_factory(cfg.judge, device=...)` builds each actor's judge (default `build_judge`)."""

    def __init__(self, cfg: "Config", judge_factory: Callable = build_judge) -> None:
        c = cfg.cluster.judge
        actor = ray.remote(JudgeActor).options(num_cpus=c.num_cpus, num_gpus=c.num_gpus, max_restarts=-1, max_task_retries=-1)
        device = "cuda" if c.num_gpus > 0 else "cpu"
        self.actors = [actor.remote(cfg.judge, device, judge_factory) for _ in range(c.num_actors)]
        self.leases = EngineLeases.remote(len(self.actors))
        self.needs_references = False

    def wait_started(self, iteration: int, cfg: "Config") -> None:
        """Every judge loaded within run.timeouts.actor_start_s (else a TimeoutError naming the pool)."""
        from spo_ray.timeouts import judge_pool_start_timeout

        refs = [a.needs_references.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=cfg.run.timeouts.actor_start_s)
        if len(ready) < len(refs):
            self.shutdown()
            raise judge_pool_start_timeout(cfg, iteration)
        self.needs_references = any(ray.get(ready))  # a constructor's error, if any, raises here

    def clients(self) -> JudgeClients:
        """The judge factory of one stream, evaluation or tournament (the leases start over)."""
        ray.get(self.leases.reset.remote())
        return JudgeClients(self.actors, self.leases, self.needs_references)

    def shutdown(self) -> None:
        for handle in (*self.actors, self.leases):
            ray.kill(handle)
