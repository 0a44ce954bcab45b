import json

import pytest

from spo_ray.data.prompts import iteration_prompts, load_prompts, prompt_reuse, split_prompts


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_builtin_tiny_prompts_load_with_ids():
    ps = load_prompts("tiny_prompts", "builtin", "prompt", "prompt_id")
    assert len(ps.rows) == 64 and ps.skipped == {}
    assert ps.rows[0]["prompt_id"] == "tiny-000" and ps.rows[0]["prompt"].endswith(".")


def test_jsonl_empty_and_duplicate_prompts_are_counted_not_dropped_silently(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", [{"q": "a?"}, {"q": ""}, {"q": "  "}, {"q": "a?"}, {"q": "b?"}])
    ps = load_prompts(src, "jsonl", "q")
    assert [r["prompt"] for r in ps.rows] == ["a?", "b?"]
    assert ps.skipped == {"empty_prompt": 2, "duplicate_id": 1}


def test_chat_message_lists_use_the_first_user_turn(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}])
    assert load_prompts(src, "jsonl", "messages").rows[0]["prompt"] == "hi"


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["x", "y"], "id": [1, 2]}), tmp_path / "p.parquet")
    ps = load_prompts(str(tmp_path / "p.parquet"), "parquet", "instruction", "id")
    assert [(r["prompt_id"], r["prompt"]) for r in ps.rows] == [("1", "x"), ("2", "y")]


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_prompts(str(tmp_path / "nope.jsonl"), "jsonl", "prompt")


def test_missing_field_lists_the_fields(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", [{"instruction": "x"}])
    with pytest.raises(KeyError, match="instruction"):
        load_prompts(src, "jsonl", "prompt")


def test_unknown_builtin_lists_known():
    with pytest.raises(FileNotFoundError, match="tiny_prompts"):
        load_prompts("nope", "builtin", "prompt")


def test_bad_json_line_is_located(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2"):
        load_prompts(str(tmp_path / "p.jsonl"), "jsonl", "prompt")


def test_split_is_seeded_and_disjoint():
    rows = [{"prompt_id": str(i), "prompt": str(i)} for i in range(20)]
    train, held = split_prompts(rows, 5, seed=3)
    assert len(train) == 15 and len(held) == 5
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in held}
    assert split_prompts(rows, 5, seed=3) == (train, held)
    assert split_prompts(rows, 5, seed=4)[1] != held
    with pytest.raises(ValueError, match="num_eval"):
        split_prompts(rows, 20, seed=0)


def test_iteration_slices_are_new_prompts_each_iteration_and_wrap():
    train = [{"prompt_id": str(i)} for i in range(10)]
    ids = lambda t: [r["prompt_id"] for r in iteration_prompts(train, t, 4)]  # noqa: E731
    assert ids(1) == ["0", "1", "2", "3"] and ids(2) == ["4", "5", "6", "7"]
    assert ids(3) == ["8", "9", "0", "1"]
    assert len(iteration_prompts(train, 1, None)) == 10


@pytest.mark.parametrize(
    ("train", "per_iteration", "iterations", "drawn", "distinct"),
    [
        (10, 4, 3, 12, 10),  # slices 0-3, 4-7, 8-9+0-1: prompts 0 and 1 twice
        (10, 4, 6, 24, 10),  # 24 draws of 10 prompts: 14 repeats
        (10, 12, 2, 20, 10),  # more than there are: all 10 in each iteration
    ],
)
def test_prompt_reuse_counts_the_repeated_prompts(train, per_iteration, iterations, drawn, distinct):
    rows = [{"prompt_id": str(i)} for i in range(train)]
    used = [r["prompt_id"] for t in range(1, iterations + 1) for r in iteration_prompts(rows, t, per_iteration)]
    reuse = prompt_reuse(train, per_iteration, iterations)
    assert (reuse.drawn, reuse.distinct, reuse.repeated) == (len(used), len(set(used)), len(used) - len(set(used)))
    assert (reuse.drawn, reuse.distinct) == (drawn, distinct)
    assert f"{drawn - distinct} of the {drawn} prompts" in reuse.describe()


def test_prompt_reuse_is_none_when_every_iteration_has_new_prompts():
    assert prompt_reuse(10, 5, 2) is None  # exactly all of them, once
    assert prompt_reuse(10, None, 3) is None  # all prompts every iteration, by choice
