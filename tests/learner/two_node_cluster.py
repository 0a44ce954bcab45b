"""One learner iteration on a two-node Ray cluster made on this machine (ray.cluster_utils.Cluster,
as Ray's own tests do): a head node (driver, stream, learner rank 0 or 1) and a worker node,
each with one `learner_slot`, so each of the two learner workers lands on its own node.

Run as its own process by tests/learner/test_multinode.py — a Cluster cannot share the test
session's Ray — and prints one JSON line (prefixed RESULT) with what the run left:

    python -m tests.learner.two_node_cluster SCENARIO RUN_DIR POLICY

Scenarios:
  stale_listing  the run dir holds two persisted parts of an earlier attempt; rank 1's node
                 lists the run dir as it was before the newer part was renamed into place (a
                 shared file system's directory cache, e.g. NFS `acdirmax`), simulated by
                 `stale_listing_on_rank_1`, which Ray runs in every worker process.
  node_lost      the worker node is removed once a step checkpoint exists (a preempted spot
                 node: its raylet and every worker on it die at once), and a replacement
                 node joins, as an autoscaler brings one up.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

STALE_CUTOFF_ENV = "SPO_RAY_TEST_STALE_CUTOFF"  # entries modified after this time (epoch s) ...
STALE_ROOT_ENV = "SPO_RAY_TEST_STALE_ROOT"  # ... under this folder are not listed on rank 1
N_PROMPTS = 8
OLD_PART, NEW_PART = 4, 2  # prompts persisted by the earlier attempt: visible to all, and the newer part
RUN = [
    "experiment=tiny", "run.deterministic=true", "rollout.num_samples=3", "rollout.max_new_tokens=8",
    "rollout.batch_size=2", "learner.epochs=1", "learner.micro_batch_size=1", "learner.global_batch_size=2",
    "learner.zero_stage=0", "learner.checkpoint_every=1", "learner.max_failures=2",
    "cluster.learner.num_workers=2", "+cluster.learner.resources.learner_slot=1",
    "run.timeouts.trainer_start_s=120",
]


def stale_listing_on_rank_1() -> None:
    """Ray's worker_process_setup_hook: in learner rank 1 (Ray Train sets RANK), `Path.glob`
    under the run dir leaves out what changed after the cut-off — the listing a node with a
    stale directory cache returns. Opening a file by its name still works."""
    cutoff, root = float(os.environ[STALE_CUTOFF_ENV]), os.environ[STALE_ROOT_ENV]
    glob = Path.glob

    def stale_glob(self: Path, pattern: str, **kwargs):
        found = glob(self, pattern, **kwargs)
        if os.environ.get("RANK") != "1" or not str(self).startswith(root):
            return found
        return (p for p in list(found) if p.stat().st_mtime <= cutoff)

    Path.glob = stale_glob


def earlier_attempt(iter_dir: Path, prompts: list[dict]) -> float:
    """Persist the first OLD_PART + NEW_PART prompts as an earlier attempt would have: two
    parts, the second renamed into place after rank 1's node cached the listing. Returns
    that cut-off time."""
    from spo_ray.learner.loop import _PairSink

    def row(p: dict) -> dict:
        return {
            "prompt_id": p["prompt_id"], "prompt": p["prompt"], "responses": ["yes", "no", "maybe"],
            "scores": [1.0, -1.0, 0.0], "win_rates": [0.7, 0.3, 0.5], "chosen": "yes", "rejected": "no",
            "chosen_probs": 0.8, "chosen_probs_win": 0.7, "chosen_probs_lose": 0.3, "iteration": 1, "skip_reason": "",
        }

    _PairSink(iter_dir, rank=0).write([row(p) for p in prompts[:OLD_PART]])
    _PairSink(iter_dir, rank=1).write([row(p) for p in prompts[OLD_PART:OLD_PART + NEW_PART]])
    now = time.time()
    old = next((iter_dir / "pairs").glob("part-*-r000-*.parquet"))
    os.utime(old, (now - 120, now - 120))
    return now - 60


def _descendants(pid: int) -> list[int]:
    """The processes below `pid` (the raylet's workers, their children)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _lose_worker_node_after_checkpoint(cluster, node, iter_dir: Path, done: threading.Event, log: dict) -> None:
    """A spot node preempted once a step checkpoint exists: its raylet and every worker on it
    (a learner worker among them) are SIGKILLed at once; a replacement node joins."""
    import signal

    from ray._private import ray_constants

    from spo_ray.learner.resume import latest_checkpoint

    while not done.is_set() and latest_checkpoint(iter_dir) is None:
        time.sleep(0.05)
    if done.is_set():
        return
    log["removed_at_step"] = json.loads((latest_checkpoint(iter_dir) / "position.json").read_text())["step"]
    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    for pid in _descendants(raylet):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.remove_node(node, allow_graceful=False)
    log["removed_at_s"] = round(time.time() - log["started"], 1)
    cluster.add_node(num_cpus=1, resources={"learner_slot": 1})  # the replacement, as an autoscaler brings one


def main(scenario: str, run_dir: str, policy: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from spo_ray.data.prompts import load_prompts
    from spo_ray.run_dir import RunDir
    from spo_ray.train import stream_and_train
    from tests.conftest import compose

    run = RunDir(Path(run_dir))
    iter_dir = run.iter_dir(1)
    prompts = load_prompts("tiny_prompts", "builtin", "prompt", "prompt_id").rows[:N_PROMPTS]
    env = {}
    runtime_env: dict = {"env_vars": env}
    if scenario == "stale_listing":
        env |= {STALE_CUTOFF_ENV: str(earlier_attempt(iter_dir, prompts)), STALE_ROOT_ENV: str(iter_dir)}
        runtime_env["worker_process_setup_hook"] = "tests.learner.two_node_cluster.stale_listing_on_rank_1"
    # shutdown_at_exit=False: no SIGTERM hook, which only the main thread may set, so the node
    # can be replaced from the watching thread; cluster.shutdown() below stops every node.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"learner_slot": 1}}, shutdown_at_exit=False)
    worker = cluster.add_node(num_cpus=1, resources={"learner_slot": 1})
    result: dict = {"scenario": scenario}
    done = threading.Event()
    try:
        ray.init(address=cluster.address, runtime_env=runtime_env, log_to_driver=True)
        ray.data.DataContext.get_current().enable_progress_bars = False
        # node_lost: one prompt per rollout batch, so the stream still runs at the first checkpoint
        _, cfg = compose(RUN + (["rollout.batch_size=1"] if scenario == "node_lost" else []))
        start = result["started"] = time.time()
        if scenario == "node_lost":
            threading.Thread(
                target=_lose_worker_node_after_checkpoint, args=(cluster, worker, iter_dir, done, result), daemon=True
            ).start()
        try:
            result["summary"] = stream_and_train(cfg, run, prompts, policy, 1)
        except Exception as err:  # noqa: BLE001 - reported to the test, which asserts on it
            result["error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        result["seconds"] = round(time.time() - start, 1)
        result["nodes_alive"] = sum(n["Alive"] for n in ray.nodes())
    finally:
        done.set()
        ray.shutdown()
        cluster.shutdown()
    return result


if __name__ == "__main__":
    out = main(*sys.argv[1:4])
    print("RESULT " + json.dumps(out), flush=True)
