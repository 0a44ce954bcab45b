"""Reference answers through the stream: prompt rows → rollout rows → JudgeStage, and the
evaluator, with the reference-guided judge (issue 8). A prompt without a reference is an
error that names it, never a silent tie."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from spo_ray.judge import attach_references
from spo_ray.judge.reference import ReferenceJudge
from spo_ray.data.schema import ROLLOUT_SCHEMA
from spo_ray.pipeline import JudgeStage, RolloutStage
from spo_ray.rollout.base import Rollout
from tests.conftest import compose


def letter_counts(texts):
    """A deterministic stand-in for a sentence embedding: counts of a, b, c."""
    return torch.tensor([[t.count(ch) + 1e-3 for ch in "abc"] for t in texts], dtype=torch.float32)


def letter_judge(cfg=None, device="cpu"):
    return ReferenceJudge(letter_counts, temperature=0.1)


class ThreeAnswers:
    """A rollout engine that answers every prompt with the same three responses."""

    responses = ["aaaa", "abab", "bbbb"]

    def __init__(self, cfg=None, policy_path=None):
        pass

    def generate(self, prompts, sampling):
        return [Rollout(list(self.responses), [4, 4, 4], [False] * 3) for _ in prompts]


def _reference_cfg(*overrides):
    return compose(["experiment=tiny", "judge=reference", "rollout.num_samples=3", *overrides])[1]


def _rollout_rows(references):
    return pa.Table.from_pylist(
        [
            {"prompt_id": f"p{n}", "prompt": f"q{n}", "responses": ThreeAnswers.responses, "response_tokens": [4, 4, 4], "reference": ref}
            for n, ref in enumerate(references)
        ],
        schema=ROLLOUT_SCHEMA,
    )


def test_judge_stage_ranks_each_prompt_against_its_own_reference():
    cfg = _reference_cfg()
    stage = JudgeStage(cfg.judge, None, iteration=1, judge_factory=letter_judge)
    rows = stage(_rollout_rows(["aaaaaa", "bbbbbb"])).to_pylist()
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("aaaa", "bbbb"), ("bbbb", "aaaa")]
    assert all(r["skip_reason"] == "" and r["chosen_probs_win"] > 0.5 > r["chosen_probs_lose"] for r in rows)


@pytest.mark.parametrize("missing", [None, "", "   "])
def test_a_prompt_without_a_reference_fails_naming_it(missing):
    cfg = _reference_cfg()
    stage = JudgeStage(cfg.judge, None, iteration=1, judge_factory=letter_judge)
    with pytest.raises(ValueError, match=r"1 reference answers are missing.*'q1'"):
        stage(_rollout_rows(["aaaaaa", missing]))


def test_rollout_stage_carries_the_reference_and_judges_without_one_ignore_it():
    cfg = _reference_cfg()
    prompts = pa.Table.from_pylist([{"prompt_id": "p0", "prompt": "q0", "reference": "ref"}])
    out = RolloutStage(cfg, "unused", 1, engine_factory=ThreeAnswers)(prompts)
    assert out.schema == ROLLOUT_SCHEMA and out.column("reference").to_pylist() == ["ref"]
    bare = RolloutStage(cfg, "unused", 1, engine_factory=ThreeAnswers)(pa.Table.from_pylist([{"prompt_id": "p0", "prompt": "q0"}]))
    assert bare.column("reference").to_pylist() == [None]

    from spo_ray.judge.rules import LengthJudge

    judge = LengthJudge()
    attach_references(judge, ["q0"], [None])  # no `needs_references`: nothing to give, no error
    assert not hasattr(judge, "_references")


def test_references_flow_through_the_ray_data_stream(ray_session):
    from spo_ray.pipeline import judge_stream, rollout_stream

    cfg = _reference_cfg("rollout.batch_size=2", "judge.batch_size=2")
    prompts = [{"prompt_id": f"p{n}", "prompt": f"q{n}", "reference": "a" * 6 if n % 2 else "b" * 6} for n in range(6)]
    rollouts = rollout_stream(cfg, prompts, "unused", 1, engine_factory=ThreeAnswers)
    rows = judge_stream(cfg, rollouts, None, 1, judge_factory=letter_judge).take_all()
    chosen = {r["prompt_id"]: r["chosen"] for r in rows}
    assert chosen == {f"p{n}": "aaaa" if n % 2 else "bbbb" for n in range(6)}


def test_reference_judge_without_references_fails_before_ray(tmp_path):
    from spo_ray.run_dir import RunDir
    from spo_ray.train import prepare_prompts

    cfg = _reference_cfg()  # the tiny built-in prompts have no reference answers
    with pytest.raises(ValueError, match=r"judge.name=reference: \d+ of \d+ prompts of data.source='tiny_prompts'"):
        prepare_prompts(cfg, RunDir(tmp_path / "run"))


# ---------------------------------------------------------------------------- evaluation
class RecordingEngine:
    """Answers `<n turns seen>:<last user message>` and records what it was given."""

    def __init__(self):
        self.seen = []

    def generate(self, prompts, sampling):
        self.seen += [p if isinstance(p, str) else list(p) for p in prompts]  # as given, before later turns
        out = []
        for p in prompts:
            turns = [{"role": "user", "content": p}] if isinstance(p, str) else p
            text = f"{len(turns)}:{turns[-1]['content']}"
            out.append(Rollout([text], [len(text)], [False]))
        return out


def test_mt_bench_turn_two_sees_the_policys_own_first_answer(tmp_path):
    from spo_ray.evaluate import mt_bench_answers, write_answer_files
    from spo_ray.rollout.base import SamplingConfig

    questions = [
        {"question_id": 81, "turns": ["Write a poem.", "Now shorter."]},
        {"question_id": 7, "turns": ["Only one turn."]},
    ]
    engine = RecordingEngine()
    sampling = SamplingConfig(num_samples=1, temperature=0.0, top_p=1.0, max_new_tokens=8, seed=0)
    answers = mt_bench_answers(engine, questions, sampling, batch_size=1, turns=2)
    assert answers == [
        {"question_id": 81, "output": ["1:Write a poem.", "3:Now shorter."]},
        {"question_id": 7, "output": ["1:Only one turn."]},
    ]
    assert engine.seen[-1] == [
        {"role": "user", "content": "Write a poem."},
        {"role": "assistant", "content": "1:Write a poem."},
        {"role": "user", "content": "Now shorter."},
    ]

    held_out = [{"prompt_id": "x", "prompt": "Say hi.", "reference": "Hi!"}]
    write_answer_files(tmp_path, held_out, ["hello"], answers, "demo-pi_1")
    assert json.loads((tmp_path / "model_outputs.json").read_text()) == [
        {"instruction": "Say hi.", "output": "hello", "generator": "demo-pi_1", "dataset": "spo_ray"}
    ]
    assert (tmp_path / "model_outputs.json").stat().st_mode & 0o777 == 0o644
    lines = [json.loads(l) for l in (tmp_path / "mt_bench_answers.jsonl").read_text().splitlines()]
    assert [(l["question_id"], l["model_id"], l["choices"][0]["turns"]) for l in lines] == [
        (7, "demo-pi_1", ["1:Only one turn."]),
        (81, "demo-pi_1", ["1:Write a poem.", "3:Now shorter."]),
    ]


def test_format_prompt_renders_a_conversation_with_the_chat_template(tiny_policy):
    from spo_ray.modeling import load_tokenizer
    from spo_ray.data.chat import format_prompt

    tok = load_tokenizer(tiny_policy)
    conversation = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    assert format_prompt(tok, conversation) == "<|user|>\nu1</s>\n<|assistant|>\na1</s>\n<|user|>\nu2</s>\n<|assistant|>\n"
    assert format_prompt(tok, "u1") == format_prompt(tok, conversation[:1]) == "<|user|>\nu1</s>\n<|assistant|>\n"
    tok.chat_template = None
    assert format_prompt(tok, "u1") == "u1"
    assert format_prompt(tok, conversation) == "user: u1\nassistant: a1\nuser: u2\nassistant:"


def test_evaluate_policy_judges_with_the_held_out_references(tiny_policy):
    """The real evaluator with the shipped MiniLM reference judge: π_t's answers against a
    baseline that copies each reference (it must win) or says nothing useful."""
    from spo_ray.evaluate import evaluate_policy

    cfg = _reference_cfg("evaluate.max_new_tokens=6", "evaluate.batch_size=4")
    references = ["Paris is the capital of France.", "Water boils at 100 degrees Celsius at sea level."]
    held_out = [{"prompt_id": f"p{n}", "prompt": f"q{n}", "reference": r} for n, r in enumerate(references)]
    result = evaluate_policy(cfg, tiny_policy, held_out, baseline=list(references))
    assert {"win_rate", "win_rate_ci", "avg_length", "wins", "ties", "losses", "judge_nan", "n", "answers", "lengths"} <= set(result)
    assert result["n"] == 2 and result["win_rate"] == 0.0  # the random policy never beats the reference itself
    with pytest.raises(ValueError, match="reference answers are missing"):
        evaluate_policy(cfg, tiny_policy, [{**held_out[0], "reference": None}], baseline=["x"])


def test_a_gguf_policy_is_converted_once_into_the_cache(tmp_path):
    from spo_ray.gguf import converted_policy

    source = tmp_path / "Model.Q4.gguf"
    source.write_bytes(b"GGUF" * 10)
    done = tmp_path / "cache" / "Model.Q4"
    done.mkdir(parents=True)
    (done / "gguf_source.json").write_text(json.dumps({"gguf_file": source.name, "size_bytes": 40}))
    assert converted_policy(str(source), tmp_path / "cache") == str(done)  # found, not converted again
