"""Issue 7: rollout engines that persist across iterations and take each new π in place,
from storage or from the learner's broadcast (spo_ray/rollout/engines.py)."""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest
import torch

from spo_ray.rollout.base import SamplingConfig
from spo_ray.rollout.hf import HFEngine
from tests.conftest import compose
from tests.fault_report import record_fault

SAMPLING = SamplingConfig(num_samples=2, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3)
PROMPTS = ["Describe the sea.", "Hi"]


@pytest.fixture(scope="module")
def other_policy(tiny_policy, tmp_path_factory) -> str:
    """π_0 with every weight moved: another policy of the same architecture."""
    from spo_ray.modeling import load_policy, load_tokenizer, save_policy

    model = load_policy(tiny_policy)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return str(save_policy(model, load_tokenizer(tiny_policy), tmp_path_factory.mktemp("policy") / "pi1"))


def _responses(path: str, prompts=PROMPTS, sampling=SAMPLING) -> list[list[str]]:
    return [r.responses for r in HFEngine(path).generate(prompts, sampling)]


# ----------------------------------------------------------------------------- HFEngine, no Ray
def test_load_weights_copies_into_the_same_tensors(tiny_policy, other_policy):
    engine = HFEngine(tiny_policy)
    storage = {n: p.data_ptr() for n, p in engine.model.named_parameters()}
    engine.load_weights(other_policy)
    assert {n: p.data_ptr() for n, p in engine.model.named_parameters()} == storage  # in place
    expected = HFEngine(other_policy).model.state_dict()
    for name, tensor in engine.model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    assert [r.responses for r in engine.generate(PROMPTS, SAMPLING)] == _responses(other_policy)


def test_load_weights_builds_again_for_another_architecture(tiny_policy, tmp_path):
    from types import SimpleNamespace

    from spo_ray.modeling import build_random_policy, save_policy
    from tests.conftest import TINY_SPEC

    wider, tokenizer = build_random_policy(SimpleNamespace(**{**TINY_SPEC, "hidden_size": 48}), seed=0)
    path = str(save_policy(wider, tokenizer, tmp_path / "wider"))
    engine = HFEngine(tiny_policy)
    engine.load_weights(path)
    assert engine.model.config.hidden_size == 48 and engine.path == path
    assert [r.responses for r in engine.generate(PROMPTS, SAMPLING)] == _responses(path)


def test_sleep_frees_the_model_and_load_brings_the_next_policy(tiny_policy, other_policy):
    engine = HFEngine(tiny_policy)
    engine.sleep(level=2)
    assert engine.model is None
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS, SAMPLING)
    engine.load_weights(other_policy)
    assert [r.responses for r in engine.generate(PROMPTS, SAMPLING)] == _responses(other_policy)


def test_engine_receives_a_broadcast_into_its_weights(tiny_policy, other_policy):
    """The learner's side (`send_weights`, rank 0) and an HFEngine's side (rank 1) of one
    sync group over gloo, in two threads; the engine ends up holding the sent weights."""
    from spo_ray.modeling import load_policy
    from tests.conftest import broadcast_to

    engine = HFEngine(tiny_policy)
    plan, count = broadcast_to(engine, load_policy(other_policy), bucket_bytes=4096)  # several buckets
    assert len(plan.buckets) > 1 and count == plan.num_tensors
    assert [r.responses for r in engine.generate(PROMPTS, SAMPLING)] == _responses(other_policy)


# ----------------------------------------------------------------------------- engine actors
@pytest.fixture
def engines(ray_session, tiny_policy):
    from spo_ray.rollout.engines import RolloutEngines

    _, cfg = compose(["experiment=tiny"])
    pool = RolloutEngines(cfg, tiny_policy)
    pool.wait_started(1, cfg)
    yield cfg, pool
    pool.shutdown()


def test_engines_reload_in_place_and_serve_the_policy_each_batch_names(engines, tiny_policy, other_policy):
    cfg, pool = engines
    client = pool.clients()(cfg, tiny_policy)
    assert [r.responses for r in client.generate(PROMPTS, SAMPLING)] == _responses(tiny_policy)
    assert [load["how"] for load in pool.load(other_policy)] == ["storage"]
    assert [load["how"] for load in pool.load(other_policy)] == ["held"]  # nothing to do twice
    # A batch names its policy: a client of π_0 gets π_0 back even though the engine moved on.
    assert [r.responses for r in client.generate(PROMPTS, SAMPLING)] == _responses(tiny_policy)


@pytest.mark.fault
def test_a_dead_engine_comes_back_holding_the_policy_asked_for(engines, arm_fault, tiny_policy, other_policy):
    """The engine dies after generating (as an OOM kill would): Ray restarts it — built from
    π_0, as first started — and retries the call, which names π_1: it reloads π_1 first."""
    from spo_ray.faults import fired

    cfg, pool = engines
    pool.load(other_policy)
    client = pool.clients()(cfg, other_policy)
    start = time.monotonic()
    clean = client.generate(PROMPTS, SAMPLING)
    clean_s = time.monotonic() - start
    with arm_fault("engine_generate@1") as folder:
        start = time.monotonic()
        out = client.generate(PROMPTS, SAMPLING)
        faulted_s = time.monotonic() - start
    assert fired("engine_generate", folder)
    assert [r.responses for r in out] == [r.responses for r in clean] == _responses(other_policy)
    record_fault("rollout engine process exits (engine_generate@1)", "generation (one batch)", True, 0, 0,
                 round(faulted_s - clean_s, 1), outcome="restarted by Ray, reloaded π_1 before the retried batch")


def test_learner_push_reaches_the_engines_without_storage(engines, other_policy):
    """`push_weights` as learner rank 0 runs it (here in the test process, world size 1)."""
    from spo_ray.modeling import load_policy
    from spo_ray.rollout.engines import push_weights

    cfg, pool = engines
    record = push_weights(load_policy(other_policy), cfg, pool, other_policy, 0, torch.device("cpu"), agree=lambda ok: ok)
    assert record["error"] is None and record["engines_received"] == [len(list(load_policy(other_policy).parameters()))]
    assert [load["how"] for load in pool.load(other_policy)] == ["held"]  # no storage read: it already holds π_1
    client = pool.clients()(cfg, other_policy)
    assert [r.responses for r in client.generate(PROMPTS, SAMPLING)] == _responses(other_policy)


def test_engines_that_cannot_be_placed_time_out_naming_the_pool(ray_session, tiny_policy):
    from spo_ray.rollout.engines import RolloutEngines

    _, cfg = compose(["experiment=tiny", "cluster.gpus_per_node=1", "cluster.rollout.num_gpus=1", "run.timeouts.actor_start_s=2"])
    with pytest.raises(TimeoutError) as err:
        RolloutEngines(cfg, tiny_policy).wait_started(1, cfg)
    text = str(err.value)
    assert text.startswith("iteration 1: the rollout pool (EngineActor × 1, 0.25 CPU + 1 GPU each)"), text
    assert "asks for 1 GPU but the whole cluster has 0" in text and "same run.dir" in text


# ----------------------------------------------------------------------------- the recipe
def test_colocated_engines_sleep_through_training_and_wake_with_the_new_policy(engines, tiny_policy, tmp_path):
    """cluster.colocate=true: the stream is generated and judged first, then the engines
    sleep (their memory is the learner's) until a batch names π_1."""
    from spo_ray.run_dir import RunDir
    from spo_ray.train import stream_and_train

    _, pool = engines
    _, cfg = compose(["experiment=tiny", "cluster.colocate=true", "learner.persistent=false", "rollout.num_samples=2", "rollout.max_new_tokens=4", "learner.epochs=1"])
    run = RunDir(tmp_path / "run")
    run.prepare_train(1)
    prompts = [{"prompt_id": f"p{i}", "prompt": f"Say {i}"} for i in range(8)]
    summary = stream_and_train(cfg, run, prompts, tiny_policy, 1, pool)
    assert summary["rows"] == 8
    assert pool.states() == [{"policy": tiny_policy, "asleep": True}]
    pi_1 = str(run.policy(1))
    client = pool.clients()(cfg, pi_1)
    assert [r.responses for r in client.generate(PROMPTS, SAMPLING)] == _responses(pi_1)
    assert pool.states() == [{"policy": pi_1, "asleep": False}]


def test_two_iterations_with_the_learner_broadcasting_to_the_engines(ray_session, tmp_path):
    """rollout.weight_sync=nccl (gloo on CPU): after iteration 1 the learner pushes π_1 to the
    engine, which then needs no storage read; iteration 2's samples are exactly what π_1
    (as saved) draws with the same seeds, so the broadcast delivered π_1 whole."""
    from spo_ray.data.prompts import iteration_prompts, load_prompts
    from spo_ray.pipeline import batch_seed
    from spo_ray.train import run_sppo

    batch_size = 4
    _, cfg = compose([
        "experiment=tiny", f"run.dir={tmp_path / 'run'}", "rollout.weight_sync=nccl", "rollout.weight_sync_bucket_mb=1",
        "data.prompts_per_iteration=8", "data.num_eval=4", "rollout.num_samples=4", "rollout.max_new_tokens=8",
        f"rollout.batch_size={batch_size}", "evaluate.max_new_tokens=8", "learner.epochs=1",
    ])
    run = run_sppo(cfg)
    sync = json.loads((run.iter_dir(1) / "weight_sync.json").read_text())
    assert sync["method"] == "nccl" and sync["engines"] == 1 and sync["from_storage"] == 0, sync
    assert sync["push"]["error"] is None and sync["push"]["engines_received"] == [sync["push"]["tensors"]]
    # after the last iteration too: π_2's evaluation answers come from the engines
    last = json.loads((run.iter_dir(2) / "weight_sync.json").read_text())
    assert last["method"] == "nccl" and last["from_storage"] == 0 and last["push"]["error"] is None, last

    # Pairs keep their K responses (skipped prompts do not): check every pair's batch.
    pairs = {r["prompt_id"]: r for r in pq.read_table(run.iter_dir(2) / "pairs").to_pylist()}
    assert pairs, "no pairs in iteration 2: nothing to compare"
    d = cfg.data
    text = {r["prompt_id"]: r["prompt"] for r in load_prompts(d.source, d.format, d.prompt_field, d.id_field).rows}
    train_ids = json.loads((run.path / "split.json").read_text())["train"]
    order = [p["prompt_id"] for p in iteration_prompts([{"prompt_id": i} for i in train_ids], 2, 8)]
    engine = HFEngine(str(run.policy(1)))
    sampling = dict(num_samples=4, temperature=1.0, top_p=1.0, max_new_tokens=8)
    checked = 0
    for start in range(0, 8, batch_size):  # the stream's batches: blocks of batch_size prompts, in order
        ids = order[start : start + batch_size]
        out = engine.generate([text[i] for i in ids], SamplingConfig(seed=batch_seed(cfg.run.seed, 2, ids), **sampling))
        for i, rollout in zip(ids, out):
            if i in pairs:
                assert rollout.responses == pairs[i]["responses"], i
                checked += 1
    assert checked == len(pairs)


def test_leases_send_each_batch_to_the_actor_with_the_fewest_in_flight(ray_session):
    import ray

    from spo_ray.rollout.engines import EngineLeases

    leases = EngineLeases.remote(2)
    try:
        acquire = lambda: ray.get(leases.acquire.remote())  # noqa: E731
        assert [acquire(), acquire(), acquire()] == [0, 1, 0]  # in flight: [2, 1]
        ray.get(leases.release.remote(1))
        ray.get(leases.release.remote(1))  # a second release of the same lease counts nothing below 0
        assert [acquire(), acquire(), acquire()] == [1, 1, 0]  # [2, 0] → [2, 1] → [2, 2] → [3, 2]
    finally:
        ray.kill(leases)
