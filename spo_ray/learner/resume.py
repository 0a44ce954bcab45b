"""How the learner picks up an unfinished iteration: step checkpoints and the data position.

A learner can stop anywhere: a worker dies (Ray Train restarts the worker group, up to
`learner.max_failures` times) or the driver dies (the same command with the same `run.dir`
starts a new TorchTrainer). Both restart the same way, from what the run dir holds:

    iter_<t>/pairs/part-*.parquet     every streamed row, persisted as it arrived (pairs ...
    iter_<t>/skipped/part-*.parquet   ... and prompts without a pair, with their position)
    iter_<t>/checkpoints/step_<n>/    the newest step checkpoint: DeepSpeed's engine state
                                      (weights, optimizer, LR schedule; ZeRO shards per rank)
                                      and position.json: epoch, step, the prompt_ids trained
                                      so far in that epoch, the token statistics (truncations,
                                      pairs the tokenizer failed on)

On restart the engine loads the checkpoint (π_{t-1} and step 0 when there is none), then
the epoch of the checkpoint continues with the rows not yet trained in it:

- epoch 1 (streamed): first the persisted rows the checkpoint had not trained on, in the
  order `persisted_rows` gives, then the stream — which Ray Train builds again and which
  leaves out every prompt already persisted (`spo_ray.pipeline.remaining_pair_stream`), so
  nothing is generated twice (with `cluster.colocate` the stream was materialized once,
  before the first attempt: the learner turns its rows already persisted into fillers);
- later epochs: all persisted pairs in an order fixed by (seed, iteration, epoch,
  prompt_id) — not by which worker received which row — minus the ones trained in it.

Rows are dealt to the ranks round-robin, padded with weight-0 fillers, so every worker
runs the same number of micro-steps and DeepSpeed's collectives stay in lockstep.

A checkpoint is written into `checkpoints/.tmp-step_<n>` by all ranks and renamed to
`step_<n>` once complete (then older ones are deleted): a crash mid-write leaves only a
`.tmp-` folder, which no restart reads. Step records after the checkpoint are dropped from
train_metrics.jsonl, since their steps run again.

With learner workers on several nodes, the run dir is on a shared file system, whose
listings may differ between nodes for a while (NFS caches a directory's entries for up to
`acdirmax`, 60 s by default): one node lists a part or a checkpoint another does not yet.
So the ranks never list for themselves: rank 0 lists (which checkpoint, which parts), its
answer is broadcast to every rank (`SharedView`), and a rank opens exactly the files rank 0
named, waiting up to `run.timeouts.shared_fs_s` for one its node does not show yet. For a
later epoch, each rank also names the parts it wrote itself, which rank 0 takes even before
its node lists them.

Not covered: the driver lists the persisted prompts too (`remaining_pair_stream` leaves
them out of a restarted stream). If its node shows a part of an earlier attempt that rank
0's does not yet, those prompts are neither streamed nor replayed in epoch 1 (later epochs
and the counts read them again).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import pyarrow.parquet as pq

from spo_ray.data.schema import filler_row
from spo_ray.run_dir import IterationFiles, read_json_lines, write_json_atomic, write_text_atomic

_STEP_DIR = re.compile(r"step_(\d+)$")
T = TypeVar("T")
Broadcast = Callable[[Any], Any]  # called by every rank; returns rank 0's argument on every rank
Gather = Callable[[Any], list]  # called by every rank; returns every rank's argument, in rank order
Part = tuple[str, bool, bool]  # a persisted part: its name, whether it has a pairs file, a skipped file


def _alone(obj: T) -> T:
    return obj


def _gather_alone(obj: T) -> list[T]:
    return [obj]


@dataclass(frozen=True)
class SharedView:
    """How the learner's ranks agree on what the shared run dir holds: rank 0 lists, every
    rank gets its answer, and a rank waits up to `wait_s` for a file rank 0 named that its
    own node does not show yet; `gather` collects every rank's own word (the parts it
    wrote). The default is a single process (the driver, a test)."""

    rank: int = 0
    broadcast: Broadcast = _alone
    wait_s: float = 0.0
    gather: Gather = _gather_alone

    def decide(self, list_on_rank_0: Callable[[], T]) -> T:
        """`list_on_rank_0()` run by rank 0 alone; its result on every rank."""
        return self.broadcast(list_on_rank_0() if self.rank == 0 else None)

    def wait_for(self, path: Path) -> Path:
        """`path`, once this node shows it (rank 0 has seen it); raises after `wait_s`."""
        deadline = time.monotonic() + self.wait_s
        while not path.exists():
            if time.monotonic() >= deadline:
                raise FileNotFoundError(
                    f"learner rank {self.rank} on {socket.gethostname()}: {path} is not visible after "
                    f"run.timeouts.shared_fs_s={self.wait_s:g}s although rank 0 listed it. Every node must mount "
                    "cluster.storage as one shared file system; raise the timeout if its listings lag "
                    "(NFS: acdirmax), then run the same command with the same run.dir to resume"
                )
            time.sleep(0.2)
        return path


def shared_view(rank: int, world: int, wait_s: float) -> SharedView:
    """The learner workers' view: torch.distributed's broadcast from rank 0 (alone: itself)."""
    if world == 1:
        return SharedView(rank, _alone, wait_s)
    import torch.distributed as dist

    def broadcast(obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(obj: Any) -> list:
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out

    return SharedView(rank, broadcast, wait_s, gather)


@dataclass
class Position:
    """Where training stands after `step` optimizer steps (what a checkpoint records)."""

    step: int = 0
    epoch: int = 0  # 0-based epoch of the last step taken
    consumed: list[str] = field(default_factory=list)  # prompt_ids trained in `epoch` so far
    prompts_truncated: int = 0
    responses_truncated: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # pairs the tokenizer failed on (TokenStats.reasons)


# ---------------------------------------------------------------------------- checkpoints
def latest_checkpoint(iter_dir: Path) -> Path | None:
    """The newest finished step checkpoint (renamed into place, position.json inside)."""
    found = [
        (int(m.group(1)), p)
        for p in IterationFiles(iter_dir).checkpoints.glob("step_*")
        if (m := _STEP_DIR.match(p.name)) and (p / "position.json").exists()
    ]
    return max(found)[1] if found else None


def save_checkpoint(engine, iter_dir: Path, position: Position, rank: int, world: int) -> Path:
    """All ranks: DeepSpeed's collective save into a temporary folder, then rank 0 renames it."""
    import torch.distributed as dist

    final = IterationFiles(iter_dir).checkpoints / f"step_{position.step:06d}"
    tmp = final.with_name(f".tmp-{final.name}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash in an earlier attempt
        tmp.mkdir(parents=True)
    _barrier(world, dist)
    engine.save_checkpoint(str(tmp), tag="engine", save_latest=False)
    if rank == 0:
        write_json_atomic(tmp / "position.json", asdict(position))
    _barrier(world, dist)  # every rank's shards are on disk
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the checkpoint is finished from here on
        for older in final.parent.glob("step_*"):
            if older != final and _STEP_DIR.match(older.name):
                shutil.rmtree(older, ignore_errors=True)
    return final


def _newest_with_position(iter_dir: Path) -> tuple[str, dict] | None:
    checkpoint = latest_checkpoint(iter_dir)
    return None if checkpoint is None else (checkpoint.name, json.loads((checkpoint / "position.json").read_text()))


def restore(engine, iter_dir: Path, view: SharedView = SharedView()) -> tuple[Position, Path | None]:
    """Load the newest checkpoint, as rank 0 sees it, into the engine (all ranks); rank 0
    drops the step records that came after it. Returns the position (step 0 when there is
    no checkpoint)."""
    chosen = view.decide(lambda: _newest_with_position(iter_dir))
    position, checkpoint = Position(), None
    if chosen is not None:
        checkpoint = IterationFiles(iter_dir).checkpoints / chosen[0]
        view.wait_for(checkpoint / "position.json")  # written last: the folder is complete
        path, _ = engine.load_checkpoint(str(checkpoint), tag="engine", load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"learner: DeepSpeed could not load the step checkpoint {checkpoint}; delete it to restart the iteration's training")
        position = Position(**chosen[1])
    if view.rank == 0:
        truncate_step_records(IterationFiles(iter_dir).train_metrics, position.step)
    return position, checkpoint


def truncate_step_records(path: Path, step: int) -> None:
    """Keep the records of steps 1..step (the later ones run again after a restart). A last
    line cut short by the crash (disk full, node lost mid-append) is dropped too: its step
    runs again, and an unreadable line here would stop every later restart."""
    if not path.exists():
        return
    kept = [record for record in read_json_lines(path) if record["step"] <= step]
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))


def _barrier(world: int, dist) -> None:
    if world > 1:
        dist.barrier()


# ---------------------------------------------------------------------------- data position
def persisted_parts(iter_dir: Path, known: Iterable[Part] = ()) -> list[Part]:
    """The complete parts this process lists, and the `known` ones it may not list yet,
    sorted by name (the writing worker's start time, its rank, the batch)."""
    files = IterationFiles(iter_dir)
    pairs, skipped = ({p.name for p in folder.glob("part-*.parquet")} for folder in (files.pairs, files.skipped))
    for name, has_pairs, has_skipped in known:
        pairs |= {name} if has_pairs else set()
        skipped |= {name} if has_skipped else set()
    return [(name, name in pairs, name in skipped) for name in sorted(pairs | skipped)]


def persisted_rows(iter_dir: Path, view: SharedView = SharedView(), written: Iterable[Part] = ()) -> list[dict]:
    """Every persisted row of the iteration, in the same order for every rank: the parts
    rank 0 lists, and those any rank says it `written` (rank 0's node may not list another
    node's newest parts yet), in name order, so each worker's rows in the order it received
    them, worker after worker; skipped prompts put back at their position within their batch."""
    files = IterationFiles(iter_dir)
    known = [part for parts in view.gather(list(written)) for part in parts]
    rows: list[dict] = []
    for name, has_pairs, has_skipped in view.decide(lambda: persisted_parts(iter_dir, known)):
        pair_file, skip_file = files.pairs / name, files.skipped / name
        batch = [{**r, "skip_reason": ""} for r in pq.read_table(view.wait_for(pair_file)).to_pylist()] if has_pairs else []
        skipped = pq.read_table(view.wait_for(skip_file)).to_pylist() if has_skipped else []
        for s in sorted(skipped, key=lambda s: s["position"]):
            batch.insert(s["position"], {"prompt": "", **{k: v for k, v in s.items() if k != "position"}})
        rows += batch
    return rows


def epoch_order(rows: Iterable[dict], seed: int, iteration: int, epoch: int) -> list[dict]:
    """The pairs of a later epoch in an order fixed by (seed, iteration, epoch, prompt_id):
    a fresh shuffle each epoch that does not depend on which worker received which row."""

    def key(row: dict) -> str:
        return hashlib.sha256(f"{seed}/{iteration}/{epoch}/{row['prompt_id']}".encode()).hexdigest()

    return sorted((r for r in rows if not r["skip_reason"]), key=key)


def deal(rows: list[dict], rank: int, world: int) -> list[dict]:
    """Rank `rank`'s share, round-robin, padded with fillers so all ranks get as many rows."""
    padded = rows + [filler_row()] * (-len(rows) % world)
    return padded[rank::world]

