"""spot_check's prompts from a finished run's held-out split (no Ray, no model)."""

from __future__ import annotations

import json

import pytest

from spo_ray.spot_check import held_out_prompts


def _run_dir(tmp_path, held_out):
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"id": f"p{i}", "text": f"prompt {i}"}) + "\n" for i in range(5)))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        f"data:\n  source: {source}\n  format: jsonl\n  prompt_field: text\n  id_field: id\n"
    )
    (run / "split.json").write_text(json.dumps({"train": ["p0", "p1"], "held_out": held_out}))
    return run


def test_held_out_prompts_come_in_the_splits_order(tmp_path):
    run = _run_dir(tmp_path, ["p4", "p2", "p3"])
    assert held_out_prompts(str(run), 2) == ["prompt 4", "prompt 2"]


def test_a_run_dir_without_its_files_or_with_unknown_ids_is_a_clear_error(tmp_path):
    run = _run_dir(tmp_path, ["p4", "p9"])
    with pytest.raises(ValueError, match=r"split.json names held-out prompts .* \(e.g. p9\)"):
        held_out_prompts(str(run), 2)
    (run / "split.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no split.json"):
        held_out_prompts(str(run), 2)
    (run / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.yaml"):
        held_out_prompts(str(run), 2)
