"""Issue 6, item 5: bad data never stops a run silently — each case is counted in the
iteration's metrics record and shown in report.md, with its rule applied.

One real streamed iteration (rollout pool → judge pool → DeepSpeed learner) on prompts
that hold, besides ordinary ones:
- a prompt whose judge scores are NaN                      → skipped, `judge_nan`
- a prompt whose responses the policy's tokenizer rejects  → pair skipped (weight 0), `tokenize_error`
- a prompt over learner.max_prompt_length, whose chosen
  response is over what is left of learner.max_length     → both truncated, counted
The policy's tokenizer has no unknown-token fallback, so a character outside its
vocabulary raises, as a real tokenizer without byte fallback does.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import compose
from tests.fault_report import record_fault

pytestmark = pytest.mark.fault

NAN_PROMPT = "Judge me with NaN"
UNTOKENIZABLE_PROMPT = "Answer with a snowman"
LONG_PROMPT = "Summarize: " + "lorem ipsum " * 12  # > 64 tokens with the character tokenizer
FORCED = {  # responses the rollout engine returns for these prompts (K=2; the keyword judge prefers "e")
    UNTOKENIZABLE_PROMPT: ["eee \u2603", "xyz \u2603"],  # ☃ is outside the character vocabulary
    LONG_PROMPT: ["e" * 100, "xyz"],  # the chosen one is longer than max_length − 64 prompt tokens
}
PROMPTS = [{"prompt_id": f"p{i}", "prompt": f"Say {i} please"} for i in range(5)] + [
    {"prompt_id": "nan", "prompt": NAN_PROMPT},
    {"prompt_id": "untokenizable", "prompt": UNTOKENIZABLE_PROMPT},
    {"prompt_id": "long", "prompt": LONG_PROMPT},
]


def forcing_engine(cfg, policy_path: str):
    """The real HFEngine; the prompts in FORCED get fixed responses."""
    from spo_ray.rollout.factory import make_engine

    engine = make_engine(cfg, policy_path)
    generate = engine.generate

    def forced(prompts, sampling):
        rollouts = generate(prompts, sampling)
        return [replace(r, responses=list(FORCED[p])) if p in FORCED else r for p, r in zip(prompts, rollouts)]

    engine.generate = forced
    return engine


class NaNForOnePrompt:
    """The configured judge, answering NaN logits for NAN_PROMPT (a judge model that overflowed)."""

    def __init__(self, cfg, device: str = "cpu") -> None:
        from spo_ray.judge import build_judge

        self.judge = build_judge(cfg, device=device)

    def batch_pairwise_logits(self, prompts, responses):
        logits = self.judge.batch_pairwise_logits(prompts, responses)
        return [m.fill_(math.nan) if p == NAN_PROMPT else m for p, m in zip(prompts, logits)]


@pytest.fixture
def no_unk_policy(tiny_policy, tmp_path) -> str:
    """tiny_policy whose tokenizer raises on a character outside its vocabulary."""
    path = Path(shutil.copytree(tiny_policy, tmp_path / "policy"))
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["model"]["unk_token"] = "<no-unk>"  # not in the vocabulary: WordLevel raises instead
    (path / "tokenizer.json").write_text(json.dumps(spec))
    return str(path)


def test_bad_data_is_counted_in_metrics_and_report_with_its_rule(ray_session, no_unk_policy, tmp_path):
    from spo_ray.pipeline import judge_stream, rollout_stream
    from spo_ray.report import write_report
    from spo_ray.run_dir import RunDir
    from spo_ray.timeouts import apply_stream_timeouts
    from spo_ray.train import iteration_record, make_trainer

    _, cfg = compose([
        "experiment=tiny", "rollout.num_samples=2", "rollout.max_new_tokens=8", "learner.micro_batch_size=2",
        "learner.global_batch_size=4", "learner.epochs=2",
    ])
    assert (cfg.learner.max_length, cfg.learner.max_prompt_length) == (128, 64)
    run = RunDir(tmp_path / "run")
    # The recipe's stream_and_train, with the two stand-in components plugged into the stages.
    rollouts = rollout_stream(cfg, PROMPTS, no_unk_policy, 1, engine_factory=forcing_engine)
    pairs = apply_stream_timeouts(judge_stream(cfg, rollouts, no_unk_policy, 1, judge_factory=NaNForOnePrompt), cfg)
    result = make_trainer(cfg, run, pairs, no_unk_policy, 1, len(PROMPTS)).fit()
    assert result.error is None
    summary = run.read_json("iter_1/learner_summary.json")

    # every prompt once in pairs/ + skipped/ (the untokenizable pair is kept in pairs/ for audit)
    pair_ids = pq.read_table(run.iter_dir(1) / "pairs").column("prompt_id").to_pylist()
    skipped = {r["prompt_id"]: r["skip_reason"] for r in pq.read_table(run.iter_dir(1) / "skipped").to_pylist()}
    assert sorted(pair_ids + list(skipped)) == sorted(p["prompt_id"] for p in PROMPTS)
    assert skipped["nan"] == "judge_nan" and "untokenizable" in pair_ids and "long" in pair_ids
    # counted once (not once per epoch), and the untokenizable pair is not counted as trained
    assert summary["skipped"]["judge_nan"] == 1 and summary["skipped"]["tokenize_error"] == 1
    assert summary["prompts_truncated"] == 1 and summary["responses_truncated"] == 1
    assert summary["pairs"] == len(pair_ids) - 1
    assert summary["pairs"] + sum(summary["skipped"].values()) == len(PROMPTS)

    # the iteration record in metrics.jsonl and the report (evaluation is not under test here)
    run.write_json("iter_0/answers.json", {"prompt_ids": [], "answers": [], "lengths": [1]})
    evaluation = {"win_rate": 1.0, "win_rate_ci": [0.2, 1.0], "avg_length": 1.0, "wins": 1, "ties": 0, "losses": 0, "judge_nan": 0, "n": 1}
    record = iteration_record(run, 1, summary, run.read_jsonl("iter_1/train_metrics.jsonl"), evaluation, 1.0, 1.0)
    run.append_metrics(record)
    written = [m for m in run.metrics() if m["kind"] == "iteration"][0]
    assert written["skipped"]["judge_nan"] == 1 and written["skipped"]["tokenize_error"] == 1
    assert (written["prompts_truncated"], written["responses_truncated"]) == (1, 1)
    report = write_report(run, {}, []).read_text()
    section = report.split("## Data handling")[1]
    header, _, row = section.split("\n\n")[2].splitlines()[:3]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["skipped: judge_nan"] == "1" and cells["skipped: tokenize_error"] == "1"
    assert cells["prompts truncated"] == "1" and cells["responses truncated"] == "1"
    assert "`tokenize_error`: the policy's tokenizer failed on the pair" in section

    for fault, phase in (("judge returns NaN for one prompt", "judging"),
                         ("response the tokenizer rejects", "training (collate)"),
                         ("prompt and response over the length limits", "training (collate)")):
        record_fault(fault, phase, True, 0, 0, None, outcome="counted in metrics.jsonl and report.md; run goes on")
