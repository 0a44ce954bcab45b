"""The dtype names a config may give (`model.dtype`, `serve.dtype`, a judge's `dtype`) and
the torch dtype each one names. Only torch is imported here: vLLM worker processes load it
through spo_ray/rollout/weight_sync.py."""

from __future__ import annotations

import torch

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware — AMX tiles (Intel Xeon since
    Sapphire Rapids) or AVX-512 BF16 (also AMD Zen 4) — which oneDNN and vLLM's CPU build
    use. Elsewhere (AVX2 only) bf16 is converted in software: vLLM's CPU build sampled
    SmolLM2-135M 3.3× slower in bf16 than in float32 on an AVX2 EPYC, and 1.7× faster on a
    Xeon with AMX (benchmarks/results/rollout_throughput_cpu*.json). Read from
    /proc/cpuinfo's flags; False where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and {"amx_bf16", "avx512_bf16"} & set(line.split()) for line in f)
    except OSError:
        return False


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config's dtype name; a name not in TORCH_DTYPES raises, listing them."""
    if name not in TORCH_DTYPES:
        raise ValueError(f"dtype={name!r} is not one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]
