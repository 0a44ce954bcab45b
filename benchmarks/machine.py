"""The machine a benchmark ran on, as the scripts in benchmarks/ record it in their JSON."""

from __future__ import annotations

import os
import platform

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides CPU matmul speed by dtype


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())
    except OSError:
        return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Which of `ISA_FLAGS` this CPU has."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [f for f in ISA_FLAGS if f in flags]


def machine_line() -> str:
    """e.g. "Intel(R) Xeon(R) Processor, 2 CPUs (avx2, avx512f, avx512_bf16, amx_bf16), 2 torch threads, Linux 6.18"."""
    import torch

    return (f"{cpu_model()}, {os.cpu_count()} CPUs ({', '.join(cpu_flags())}), {torch.get_num_threads()} torch threads, "
            f"{platform.system()} {platform.release()}")
