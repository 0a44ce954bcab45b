"""The stream of one iteration: pair selection, then the real Ray Data → Ray Train path."""

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from spo_ray.data.schema import PAIR_SCHEMA, ROLLOUT_SCHEMA, STREAM_SCHEMA, select_pairs
from spo_ray.pipeline import batch_seed
from tests.conftest import compose


def _judged(rows):
    table = pa.Table.from_pylist(
        [{"prompt_id": pid, "prompt": "q", "responses": resp, "response_tokens": [1] * len(resp)} for pid, resp, _ in rows],
        schema=ROLLOUT_SCHEMA,
    )
    return table.append_column("scores", pa.array([s for _, _, s in rows], pa.list_(pa.float64())))


def test_select_pairs_rows_by_hand_and_skip_reasons():
    out = select_pairs(
        _judged([
            ("a", ["x", "y", "z"], [1.0, 0.0, 0.0]),
            ("b", ["x", "y"], [0.5, 0.5]),
            ("c", ["x", "y"], [math.nan, 0.0]),
            ("d", ["x"], [0.0]),
        ]),
        iteration=3,
    )
    assert out.schema == STREAM_SCHEMA
    rows = out.to_pylist()
    assert [r["skip_reason"] for r in rows] == ["", "all_tied", "judge_nan", "too_few_responses"]
    a = rows[0]
    # P = σ(s_i − s_j): p̂_0 = (½ + 2σ(1))/3, p̂_1 = p̂_2 = (σ(−1) + ½ + ½)/3
    s1, sm1 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))
    assert (a["chosen"], a["rejected"], a["iteration"]) == ("x", "y", 3)
    assert a["chosen_probs"] == pytest.approx(s1)
    assert a["chosen_probs_win"] == pytest.approx((0.5 + 2 * s1) / 3)
    assert a["chosen_probs_lose"] == pytest.approx((sm1 + 1) / 3)
    assert a["win_rates"] == pytest.approx([(0.5 + 2 * s1) / 3, (sm1 + 1) / 3, (sm1 + 1) / 3])


def test_batch_seed_depends_on_prompts_iteration_and_seed_only():
    assert batch_seed(0, 1, ["a", "b"]) == batch_seed(0, 1, ["a", "b"])
    assert len({batch_seed(0, 1, ["a"]), batch_seed(1, 1, ["a"]), batch_seed(0, 2, ["a"]), batch_seed(0, 1, ["b"])}) == 4


def test_one_streamed_iteration_counts_every_prompt_and_trains(ray_session, tiny_policy, tmp_path):
    """prompts → rollout pool → judge pool → TorchTrainer (DeepSpeed): every prompt comes
    out once, as a pair or a counted skip; π_1 is saved, loads, and differs from π_0."""
    from transformers import AutoModelForCausalLM

    from spo_ray.data.prompts import load_prompts
    from spo_ray.run_dir import RunDir
    from spo_ray.train import stream_and_train

    _, cfg = compose([
        "experiment=tiny",
        "rollout.num_samples=3", "rollout.max_new_tokens=12", "rollout.batch_size=4",
        "learner.micro_batch_size=2", "learner.global_batch_size=4", "learner.epochs=2",
        f"model.random_init.hidden_size=32",
    ])
    prompts = load_prompts("tiny_prompts", "builtin", "prompt", "prompt_id").rows[:14]
    run = RunDir(tmp_path / "run")
    summary = stream_and_train(cfg, run, prompts, tiny_policy, 1)

    pairs = pq.read_table(run.iter_dir(1) / "pairs")
    assert pairs.schema.remove_metadata() == PAIR_SCHEMA
    skipped_dir = run.iter_dir(1) / "skipped"
    skipped = pq.read_table(skipped_dir).to_pylist() if any(skipped_dir.iterdir()) else []
    pair_ids = pairs.column("prompt_id").to_pylist()
    # rows out + counted skips = prompts in, each prompt exactly once
    assert sorted(pair_ids + [s["prompt_id"] for s in skipped]) == sorted(p["prompt_id"] for p in prompts)
    assert summary["rows"] == 14 and summary["pairs"] == len(pair_ids)
    assert sum(summary["skipped"].values()) == len(skipped)
    for row in pairs.to_pylist():
        assert len(row["responses"]) == 3 and row["chosen"] in row["responses"] and row["rejected"] in row["responses"]
        assert row["chosen_probs_win"] >= row["chosen_probs_lose"] and row["iteration"] == 1

    steps = [l for l in (run.iter_dir(1) / "train_metrics.jsonl").read_text().splitlines() if l]
    # ceil(pairs-or-skips / 4) per epoch, two epochs (the second re-reads the persisted pairs)
    assert summary["steps"] == len(steps) >= 2
    new = AutoModelForCausalLM.from_pretrained(run.policy(1))
    old = AutoModelForCausalLM.from_pretrained(tiny_policy)
    diffs = [not torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values())]
    assert any(diffs)
    assert (run.policy(1) / "model.safetensors").exists() and (run.policy(1) / "tokenizer.json").exists()
