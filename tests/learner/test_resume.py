"""Resuming the learner (spo_ray/learner/resume.py): the data position, step checkpoints,
and — with real Ray Data, Ray Train and DeepSpeed — a learner worker killed mid-iteration
and a run repeated with the same seed."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from spo_ray.data.schema import FILLER
from spo_ray.learner.resume import (
    Position, SharedView, deal, epoch_order, latest_checkpoint, persisted_rows, restore, save_checkpoint, truncate_step_records
)
from tests.conftest import compose
from tests.fault_report import record_fault


def _row(pid: str, skip: str = "") -> dict:
    return {"prompt_id": pid, "skip_reason": skip}


def test_later_epochs_order_rows_by_seed_and_prompt_not_by_who_received_them():
    rows = [_row(f"p{i}") for i in range(10)] + [_row("s", "all_tied")]
    as_received_by_rank_0, as_received_by_rank_1 = rows[::2] + rows[1::2], rows[::-1]
    order = [r["prompt_id"] for r in epoch_order(as_received_by_rank_0, 0, 1, 1)]
    assert order == [r["prompt_id"] for r in epoch_order(as_received_by_rank_1, 0, 1, 1)]
    assert sorted(order) == sorted(f"p{i}" for i in range(10))  # skipped prompts have no pair to train
    assert order != [r["prompt_id"] for r in epoch_order(rows, 0, 1, 2)]  # a fresh order each epoch


def test_deal_splits_evenly_with_fillers_and_a_resumed_suffix_keeps_each_ranks_rows():
    rows = [_row(f"p{i}") for i in range(7)]
    shares = [deal(rows, r, 3) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]
    assert sorted(r["prompt_id"] for s in shares for r in s if r["skip_reason"] != FILLER) == sorted(r["prompt_id"] for r in rows)
    # after one global step of 3 rows, the rest is dealt as it was before the restart
    assert [deal(rows[3:], r, 3) for r in range(3)] == [s[1:] for s in shares]


def test_persisted_rows_come_back_in_arrival_order_with_skips_in_place(tmp_path):
    from spo_ray.learner.loop import _PairSink

    row = lambda pid, skip="": {  # noqa: E731
        "prompt_id": pid, "prompt": "q", "responses": ["a", "b"], "scores": [1.0, 0.0], "win_rates": [0.6, 0.4],
        "chosen": "a", "rejected": "b", "chosen_probs": 0.7, "chosen_probs_win": 0.6, "chosen_probs_lose": 0.4,
        "iteration": 1, "skip_reason": skip,
    }
    first, second = _PairSink(tmp_path, rank=0), _PairSink(tmp_path, rank=0)  # two attempts
    first.write([row("a"), row("b", "all_tied"), row("c")])
    first.write([row("d", "judge_nan"), row("e")])
    second.write([row("f")])
    (tmp_path / "pairs" / ".part-x.parquet.tmp").write_text("half written")  # never read
    rows = persisted_rows(tmp_path)
    assert [(r["prompt_id"], r["skip_reason"]) for r in rows] == [
        ("a", ""), ("b", "all_tied"), ("c", ""), ("d", "judge_nan"), ("e", ""), ("f", "")
    ]


def test_only_a_renamed_checkpoint_with_its_position_counts_and_later_records_are_dropped(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for name, position in (("step_000002", True), ("step_000004", False), (".tmp-step_000006", True)):
        (ckpts / name).mkdir(parents=True)
        if position:
            (ckpts / name / "position.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == ckpts / "step_000002"
    metrics = tmp_path / "train_metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    truncate_step_records(metrics, 2)
    assert [json.loads(l)["step"] for l in metrics.read_text().splitlines()] == [1, 2]


def test_a_step_record_cut_short_by_the_crash_does_not_stop_the_restart(tmp_path):
    metrics = tmp_path / "train_metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    truncate_step_records(metrics, 3)
    assert [json.loads(l)["step"] for l in metrics.read_text().splitlines()] == [1, 2, 3]
    metrics.write_text('{"step": 1}\n{"st')
    truncate_step_records(metrics, 0)
    assert metrics.read_text() == ""


class _Engine:
    """The two calls of DeepSpeed's engine that save_checkpoint and restore make."""

    def save_checkpoint(self, path: str, tag: str, save_latest: bool) -> None:
        (Path(path) / tag).mkdir()

    def load_checkpoint(self, path: str, tag: str, **_) -> tuple[str, dict]:
        return path, {}


def test_pairs_the_tokenizer_failed_on_before_a_checkpoint_are_still_counted_after_a_restart(tmp_path, monkeypatch):
    from spo_ray.data.schema import TokenStats
    from spo_ray.learner import loop

    rank0 = TokenStats(prompts_truncated=1, responses_truncated=2, reasons={"tokenize_error": 3})
    rank1 = TokenStats(prompts_truncated=0, responses_truncated=1, reasons={"tokenize_error": 1})
    monkeypatch.setattr(loop, "_all_gather", lambda obj, world: [obj, asdict(rank1)])  # 2 ranks
    position = Position(step=2)
    loop._record_stats(position, rank0, world=2)
    save_checkpoint(_Engine(), tmp_path, position, rank=0, world=1)

    restored, _ = restore(_Engine(), tmp_path)
    assert loop._restored_stats(restored, rank=0) == TokenStats(1, 3, {"tokenize_error": 4})
    assert loop._restored_stats(restored, rank=1) == TokenStats()  # the ranks' counts are summed at the end

    # a position.json written before the tokenizer failures were recorded still loads
    old = {k: v for k, v in json.loads((latest_checkpoint(tmp_path) / "position.json").read_text()).items() if k != "reasons"}
    (latest_checkpoint(tmp_path) / "position.json").write_text(json.dumps(old))
    assert restore(_Engine(), tmp_path)[0] == Position(step=2, prompts_truncated=1, responses_truncated=3)


class _TwoRanks:
    """Two learner ranks as threads: `broadcast` hands rank 0's object to both, `gather`
    both objects to both, as torch.distributed's broadcast_object_list and
    all_gather_object do; `after_listing()` runs between rank 0's listing and any reading."""

    def __init__(self, after_listing=lambda: None) -> None:
        import threading

        self.barrier, self.after_listing, self.box, self.slots = threading.Barrier(2, timeout=30), after_listing, None, [None, None]

    def view(self, rank: int, wait_s: float = 10.0) -> SharedView:
        def broadcast(obj):
            if rank == 0:
                self.box = obj
                self.after_listing()
            self.barrier.wait()
            out = self.box
            self.barrier.wait()  # both have read it before the next call writes
            return out

        def gather(obj):
            self.slots[rank] = obj
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()
            return out

        return SharedView(rank, broadcast, wait_s, gather)

    def run_rank_0(self, fn):
        """Start rank 0's call in a thread; returns a function that joins it and gives its result."""
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1)
        future = pool.submit(fn, self.view(0))
        return lambda: (future.result(30), pool.shutdown())[0]


def _sink_rows(pids: list[str]) -> list[dict]:
    return [
        {"prompt_id": p, "prompt": "q", "responses": ["a", "b"], "scores": [1.0, 0.0], "win_rates": [0.6, 0.4], "chosen": "a",
         "rejected": "b", "chosen_probs": 0.7, "chosen_probs_win": 0.6, "chosen_probs_lose": 0.4, "iteration": 1, "skip_reason": ""}
        for p in pids
    ]


def test_every_rank_reads_the_parts_rank_0_listed_although_its_node_lists_others(tmp_path):
    """Rank 1's node lists the shared run dir differently: a part written after rank 0 listed
    is there, one rank 0 listed is not yet (a directory cache). Rank 1 reads what rank 0
    listed, waiting for the part it does not see, so both replay the same rows."""
    import threading

    from spo_ray.learner.loop import _PairSink

    _PairSink(tmp_path, rank=0).write(_sink_rows(["a", "b"]))
    _PairSink(tmp_path, rank=1).write(_sink_rows(["c"]))
    hidden = next((tmp_path / "pairs").glob("part-*-r001-*"))

    def after_listing() -> None:
        _PairSink(tmp_path, rank=0).write(_sink_rows(["late"]))  # renamed into place after rank 0 listed
        aside = hidden.rename(tmp_path / "aside")  # not visible on rank 1's node yet ...
        threading.Timer(0.5, aside.rename, args=(hidden,)).start()  # ... until half a second later

    ranks = _TwoRanks(after_listing)
    rank_0_rows = ranks.run_rank_0(lambda view: persisted_rows(tmp_path, view))
    rows = persisted_rows(tmp_path, ranks.view(1))
    assert [r["prompt_id"] for r in rows] == [r["prompt_id"] for r in rank_0_rows()] == ["a", "b", "c"]
    assert [r["prompt_id"] for r in persisted_rows(tmp_path)] == ["a", "b", "c", "late"]  # the next listing has it


def test_rank_0_takes_the_parts_another_rank_wrote_although_its_own_node_does_not_list_them(tmp_path):
    """Epoch 2 starts right after rank 1 wrote its last part of epoch 1; rank 0's node does
    not list it yet. Rank 1 says it wrote it, so both read it (waiting until it shows)."""
    from spo_ray.learner.loop import _PairSink

    _PairSink(tmp_path, rank=0).write(_sink_rows(["a"]))
    sink = _PairSink(tmp_path, rank=1)
    sink.write(_sink_rows(["b"]))
    newest = next((tmp_path / "pairs").glob("part-*-r001-*"))
    aside = newest.rename(tmp_path / "aside")  # not listed on rank 0's node ...
    ranks = _TwoRanks(after_listing=lambda: aside.rename(newest))  # ... shown once rank 0 has listed
    rank_0_rows = ranks.run_rank_0(lambda view: persisted_rows(tmp_path, view))
    rows = persisted_rows(tmp_path, ranks.view(1), written=sink.written)
    assert [r["prompt_id"] for r in rows] == [r["prompt_id"] for r in rank_0_rows()] == ["a", "b"]


def test_every_rank_loads_the_checkpoint_rank_0_chose_and_its_position(tmp_path):
    """A later checkpoint renamed into place after rank 0 chose (the previous attempt's last
    rename, seen late) is not loaded by rank 1: both ranks load rank 0's, with its position."""
    loaded = []

    class Engine(_Engine):
        def load_checkpoint(self, path: str, tag: str, **_) -> tuple[str, dict]:
            loaded.append(Path(path).name)
            return path, {}

    save_checkpoint(Engine(), tmp_path, Position(step=2, consumed=["a", "b"]), rank=0, world=1)
    later = tmp_path / "checkpoints" / "step_000004"

    def after_listing() -> None:  # the previous attempt's last rename, seen late
        later.mkdir()
        (later / "position.json").write_text(json.dumps(asdict(Position(step=4, consumed=["a", "b", "c", "d"]))))

    ranks = _TwoRanks(after_listing)
    rank_0 = ranks.run_rank_0(lambda view: restore(Engine(), tmp_path, view))
    position, checkpoint = restore(Engine(), tmp_path, ranks.view(1))
    assert (position, checkpoint) == rank_0() == (Position(step=2, consumed=["a", "b"]), tmp_path / "checkpoints" / "step_000002")
    assert loaded == ["step_000002", "step_000002"]
    assert latest_checkpoint(tmp_path) == later  # the next listing has it


def test_a_file_rank_0_listed_that_never_shows_fails_naming_the_timeout(tmp_path):
    view = SharedView(rank=1, broadcast=lambda _: [("part-x.parquet", True, False)], wait_s=0.3)
    with pytest.raises(FileNotFoundError, match=r"pairs/part-x.parquet is not visible after run.timeouts.shared_fs_s=0.3s"):
        persisted_rows(tmp_path, view)


def test_the_eta_after_a_resume_counts_only_the_steps_this_attempt_took():
    from spo_ray.learner.loop import LearnerSummary, _eta_s

    resumed = LearnerSummary(steps=12, resumed_from_step=10)  # 2 steps in 20 s, 8 to go
    assert _eta_s(20.0, resumed, total_steps=20) == 80.0
    assert _eta_s(20.0, LearnerSummary(steps=2), total_steps=20) == 180.0


def _split_equally(ds, workers: int) -> list[list[str]]:
    """What each of `workers` learner workers receives (Ray Train splits with equal=True)."""
    from concurrent.futures import ThreadPoolExecutor

    shards = ds.streaming_split(workers, equal=True)
    with ThreadPoolExecutor(workers) as pool:  # the shards are read at the same time, as by the workers
        return list(pool.map(lambda it: [r["prompt_id"] for r in it.iter_rows()], shards))


def test_fillers_keep_the_equal_split_from_dropping_a_prompt(ray_session):
    import ray

    from spo_ray.data.schema import STREAM_SCHEMA, filler_row
    from spo_ray.pipeline import pad_for_workers

    rows = [{**filler_row(), "prompt_id": f"p{i}", "skip_reason": "all_tied", "iteration": 1} for i in range(5)]
    stream = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=STREAM_SCHEMA))
    assert sum(map(len, _split_equally(stream, 2))) == 4  # Ray Data drops one row to equalize
    shards = _split_equally(pad_for_workers(stream, len(rows), 2), 2)
    assert len(shards[0]) == len(shards[1]) == 3
    assert sorted(i for s in shards for i in s if i) == [f"p{i}" for i in range(5)]


# ---------------------------------------------------------------------------- real Ray runs
# 12 prompts, 4 rows per optimizer step (2 micro-batches of 2): epoch 1 has 3 steps (pairs
# and skips), epoch 2 one step per 4 pairs; a checkpoint every 2 steps.
RUN = [
    "experiment=tiny", "rollout.num_samples=3", "rollout.max_new_tokens=12", "rollout.batch_size=4",
    "learner.micro_batch_size=2", "learner.global_batch_size=4", "learner.epochs=2",
    "learner.checkpoint_every=2", "learner.max_failures=2", "run.deterministic=true",
]
N_PROMPTS = 12


@pytest.fixture(scope="module")
def clean_run(ray_session, tiny_policy, tmp_path_factory):
    """One unfaulted iteration: the reference for the faulted and the repeated run."""
    return _iteration(tiny_policy, tmp_path_factory.mktemp("clean") / "run")


def _iteration(policy: str, run_dir) -> dict:
    from spo_ray.data.prompts import load_prompts
    from spo_ray.run_dir import RunDir
    from spo_ray.train import stream_and_train

    _, cfg = compose(RUN)
    prompts = load_prompts("tiny_prompts", "builtin", "prompt", "prompt_id").rows[:N_PROMPTS]
    run = RunDir(run_dir)
    start = time.time()
    summary = stream_and_train(cfg, run, prompts, policy, 1)
    return dict(
        run=run,
        seconds=time.time() - start,
        summary=summary,
        prompt_ids=sorted(p["prompt_id"] for p in prompts),
        rows=persisted_rows(run.iter_dir(1)),
        steps=run.read_jsonl("iter_1/train_metrics.jsonl"),
        weights=_weights(run.policy(1)),
    )


def _weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _pairs_by_prompt(rows: list[dict]) -> dict[str, dict]:
    return {r["prompt_id"]: r for r in rows}


def _assert_each_prompt_once_per_epoch(result: dict) -> None:
    pairs = sorted(r["prompt_id"] for r in result["rows"] if not r["skip_reason"])
    for epoch, expected in ((0, result["prompt_ids"]), (1, pairs)):
        trained = [i for s in result["steps"] if s["epoch"] == epoch for i in s["prompt_ids"]]
        assert sorted(trained) == expected, f"epoch {epoch + 1}: a prompt trained twice or not at all"


@pytest.mark.fault
def test_learner_worker_killed_mid_epoch_resumes_from_its_checkpoint_exactly(clean_run, tiny_policy, tmp_path, arm_fault):
    """A learner worker exits after step 3 (the last of epoch 1; checkpoint at step 2). Ray
    Train restarts the worker group; the loop loads step 2, replays the rows persisted after
    it (step 3's), the rebuilt stream generates nothing (every prompt is persisted), epoch 2
    runs as before. Same pairs, same steps, same prompts per step and bit-identical weights as
    the unfaulted run — which also shows a run is reproducible with `run.deterministic`."""
    from spo_ray.faults import fired

    with arm_fault("learner_step@3") as folder:
        faulted = _iteration(tiny_policy, tmp_path / "run")
        assert fired("learner_step", folder), "the fault never fired: the test proves nothing"

    ids = [r["prompt_id"] for r in faulted["rows"]]
    lost, repeated = len(set(clean_run["prompt_ids"]) - set(ids)), len(ids) - len(set(ids))
    record_fault(
        "learner worker exits (learner_step@3)", "training", recovered=faulted["summary"]["rows"] == N_PROMPTS,
        prompts_lost=lost, prompts_repeated=repeated, extra_s=faulted["seconds"] - clean_run["seconds"],
        faulted_s=round(faulted["seconds"], 1), clean_s=round(clean_run["seconds"], 1),
    )
    assert lost == repeated == 0 and sorted(ids) == clean_run["prompt_ids"]
    summary = faulted["summary"]
    assert summary["resumed_from_step"] == 2 and summary["streamed_rows"] == 0  # nothing generated twice
    assert summary["replayed_rows"] == N_PROMPTS - 8  # step 3's rows, persisted after the checkpoint
    for key in ("rows", "pairs", "skipped", "steps"):
        assert summary[key] == clean_run["summary"][key], key
    _assert_each_prompt_once_per_epoch(faulted)
    _assert_each_prompt_once_per_epoch(clean_run)
    assert [s["prompt_ids"] for s in faulted["steps"]] == [s["prompt_ids"] for s in clean_run["steps"]]
    assert [s["loss"] for s in faulted["steps"]] == [s["loss"] for s in clean_run["steps"]]
    assert _pairs_by_prompt(faulted["rows"]) == _pairs_by_prompt(clean_run["rows"])
    for name, tensor in clean_run["weights"].items():
        assert torch.equal(tensor, faulted["weights"][name]), name
    checkpoints = sorted(p.name for p in (faulted["run"].iter_dir(1) / "checkpoints").iterdir())
    assert checkpoints == [f"step_{summary['steps'] // 2 * 2:06d}"]  # only the newest, no .tmp- left
