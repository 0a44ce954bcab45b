"""The dtype names a config may give (`model.dtype`, `serve.dtype`, a judge's `dtype`) and
the torch dtype each one names. Only torch is imported here: vLLM worker processes load it
through spo_ray/rollout/weight_sync.py."""

from __future__ import annotations

import torch

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config's dtype name; a name not in TORCH_DTYPES raises, listing them."""
    if name not in TORCH_DTYPES:
        raise ValueError(f"dtype={name!r} is not one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]
