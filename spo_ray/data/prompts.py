"""Prompt sources: read, validate, split into train / held-out, and slice per iteration.

A prompt row is `{"prompt_id": str, "prompt": str, "reference": str | None}`. Sources:
jsonl / json / parquet files, Hugging Face datasets saved with `save_to_disk`, built-in
sets shipped in `spo_ray/assets/`, and the AlpacaEval / MT-Bench formats
(`spo_ray.data.prompt_sets`). UltraFeedback-style rows whose prompt field is a list of
chat messages use the first user message.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from spo_ray.data.prompt_sets import load_alpaca_eval, load_mt_bench, prompt_id_for


@dataclass
class PromptSet:
    """Valid prompt rows plus what was rejected on the way in (counted, never silent)."""

    rows: list[dict]
    skipped: dict[str, int] = field(default_factory=dict)


def _read_records(source: str, fmt: str) -> list[dict]:
    if fmt == "builtin":
        name = f"{source}.jsonl"
        asset = resources.files("spo_ray") / "assets" / name
        if not asset.is_file():
            known = sorted(p.name[: -len(".jsonl")] for p in (resources.files("spo_ray") / "assets").iterdir())
            raise FileNotFoundError(f"data.source={source!r}: no built-in prompt set; known: {', '.join(known)}")
        return [json.loads(line) for line in asset.read_text().splitlines() if line.strip()]
    if fmt in ("alpaca_eval", "mt_bench"):
        loader = load_alpaca_eval if fmt == "alpaca_eval" else load_mt_bench
        return loader(None if source in ("", "shipped") else source)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"data.source={source!r} does not exist. Give a {fmt} file/folder path "
            "(relative paths are relative to the directory you launched from)."
        )
    if fmt == "jsonl":
        records = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{source}:{n}: not valid JSON ({err})") from None
        return records
    if fmt == "json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise ValueError(f"{source}: expected a JSON list of objects, got {type(data).__name__}")
        return data
    if fmt == "parquet":
        return pq.read_table(path).to_pylist()
    if fmt == "hf_disk":
        from datasets import load_from_disk  # optional: only for datasets saved with save_to_disk

        ds = load_from_disk(str(path))
        if hasattr(ds, "keys"):  # a DatasetDict: take its train split, else the first one
            ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
        return ds.to_list()
    raise ValueError(f"data.format={fmt!r} is not supported")


def _prompt_text(value: Any) -> str | None:
    """A prompt field's text: a string, or the first user turn of a chat message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for message in value:
            if isinstance(message, dict) and message.get("role") == "user":
                return message.get("content")
            if isinstance(message, str):  # MT-Bench style turns
                return message
    return None


def load_prompts(source: str, fmt: str, prompt_field: str, id_field: str | None = None) -> PromptSet:
    """Read a prompt source into rows; a missing field in every record is an error, an empty
    or unreadable prompt in some records is a counted skip."""
    records = _read_records(source, fmt)
    if not records:
        raise ValueError(f"data.source={source!r} holds no records")
    if all(prompt_field not in r for r in records):
        raise KeyError(
            f"data.prompt_field={prompt_field!r} is in none of the records of {source!r}; "
            f"their fields are: {', '.join(sorted(records[0]))}"
        )
    if id_field and all(id_field not in r for r in records):
        raise KeyError(
            f"data.id_field={id_field!r} is in none of the records of {source!r}; set it to one of "
            f"{', '.join(sorted(records[0]))} or to null to derive ids from the prompt text"
        )
    rows, skipped, seen = [], {}, set()
    for record in records:
        text = _prompt_text(record.get(prompt_field))
        if text is None or not text.strip():
            skipped["empty_prompt"] = skipped.get("empty_prompt", 0) + 1
            continue
        pid = str(record[id_field]) if id_field and record.get(id_field) is not None else prompt_id_for(text)
        if pid in seen:
            skipped["duplicate_id"] = skipped.get("duplicate_id", 0) + 1
            continue
        seen.add(pid)
        rows.append({"prompt_id": pid, "prompt": text, "reference": record.get("reference")})
    if not rows:
        raise ValueError(f"data.source={source!r}: every prompt was empty or a duplicate")
    return PromptSet(rows, skipped)


def split_prompts(rows: list[dict], num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded, disjoint (train, held-out) split; held-out prompts are never trained on."""
    if num_eval >= len(rows):
        raise ValueError(
            f"data.num_eval={num_eval} leaves no training prompts out of {len(rows)}; lower it"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:num_eval])
    train = [r for i, r in enumerate(rows) if i not in held]
    held_out = [rows[i] for i in sorted(held)]
    return train, held_out


@dataclass(frozen=True)
class PromptReuse:
    """The iterations' prompt slices wrap around the training prompts: `iterations` slices
    of `per_iteration` (at most `train`) cover only `distinct` prompts, so `repeated` of the
    `drawn` prompts are ones an earlier iteration already trained on."""

    train: int
    per_iteration: int
    iterations: int

    @property
    def drawn(self) -> int:
        return self.iterations * min(self.per_iteration, self.train)

    @property
    def distinct(self) -> int:
        # Consecutive slices cover consecutive positions modulo `train`.
        return min(self.train, self.iterations * self.per_iteration)

    @property
    def repeated(self) -> int:
        return self.drawn - self.distinct

    def describe(self) -> str:
        if self.per_iteration > self.train:
            what = f"data.prompts_per_iteration={self.per_iteration} > the {self.train} training prompts: each iteration uses all {self.train}"
        else:
            what = (
                f"data.prompts_per_iteration={self.per_iteration} × run.iterations={self.iterations} = "
                f"{self.per_iteration * self.iterations} > the {self.train} training prompts: the slices wrap around"
            )
        return (
            f"{what}, so {self.repeated} of the {self.drawn} prompts trained on repeat a prompt of an earlier iteration "
            "(SPPO takes new prompts each iteration); lower data.prompts_per_iteration or run.iterations, or use more prompts"
        )


def prompt_reuse(train: int, per_iteration: int | None, iterations: int) -> PromptReuse | None:
    """How the slices of `iteration_prompts` overlap, or None when every iteration's prompts
    are new (`per_iteration` None means all prompts every iteration, by choice: not reported)."""
    if per_iteration is None or per_iteration * iterations <= train:
        return None
    return PromptReuse(train, per_iteration, iterations)


def iteration_prompts(train: list[dict], iteration: int, per_iteration: int | None) -> list[dict]:
    """Prompts of iteration t (1-based): all of them, or the t-th slice of `per_iteration`
    (wrapping around: `prompt_reuse` says how many repeat), as the paper uses new prompts
    each iteration."""
    if per_iteration is None or per_iteration >= len(train):
        return list(train)
    start = ((iteration - 1) * per_iteration) % len(train)
    return [train[(start + i) % len(train)] for i in range(per_iteration)]

