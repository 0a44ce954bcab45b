"""The default experiment (`make demo`: SmolLM2-135M-Instruct from the shipped GGUF, the
reference-guided judge, AlpacaEval prompts) end to end, scaled down to one short iteration.
The only test that trains the real model."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_smollm2_demo_writes_eval_answer_files_and_report(ray_session, tmp_path_factory, tmp_path):
    questions = tmp_path / "question.jsonl"
    questions.write_text(
        json.dumps({"question_id": 81, "category": "writing", "turns": ["Name a colour.", "And another one?"]}) + "\n"
    )
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable, "-m", "spo_ray.train", f"run.dir={run}",
            # the default experiment, smollm2_demo, scaled down
            "run.iterations=1", "data.prompts_per_iteration=4", "data.num_eval=4",
            "rollout.max_new_tokens=8", "evaluate.max_new_tokens=8",
            f"evaluate.mt_bench_source={questions}", "evaluate.mt_bench_turns=2",
            f"model.gguf_cache_dir={tmp_path_factory.getbasetemp() / 'gguf'}",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "[eval] held-out answers 4/4" in out and "[eval] judging 4 answers" in out and "[learner] iter 1" in out
    assert proc.stdout.rstrip().splitlines()[-1].endswith(f"report: {run / 'report.md'}")

    assert (run / "iter_0" / "policy" / "model.safetensors").is_file()
    config = (run / "config.yaml").read_text()
    assert "experiment: smollm2_demo" in config and "name: reference" in config and "engine: vllm" in config
    split = json.loads((run / "split.json").read_text())
    assert len(split["held_out"]) == 4 and not set(split["held_out"]) & set(split["train"])

    ev = json.loads((run / "iter_1" / "eval.json").read_text())
    assert set(ev) >= {"win_rate", "win_rate_ci", "avg_length", "wins", "ties", "losses", "judge_nan", "n"} and ev["n"] == 4
    for t in (0, 1):
        outputs = json.loads((run / f"iter_{t}" / "model_outputs.json").read_text())
        assert len(outputs) == 4 and outputs[0]["generator"] == f"smollm2_demo-pi_{t}"
        assert set(outputs[0]) == {"instruction", "output", "generator", "dataset"}
        (answer,) = [json.loads(l) for l in (run / f"iter_{t}" / "mt_bench_answers.jsonl").read_text().splitlines()]
        assert answer["question_id"] == 81 and len(answer["choices"][0]["turns"]) == 2

    report = (run / "report.md").read_text()
    assert "| 1 | " in report and "logratios.png" in report and "## Examples" in report
    assert (run / "win_rate.png").is_file() and (run / "logratios.png").is_file()
    (record,) = json.loads((run / "iterations.json").read_text())
    assert record["iteration"] == 1 and record["win_rate"] == ev["win_rate"] and "margin" in record
