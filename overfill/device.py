"""Device and precision selection: the one place that decides where and in what dtype we compute.

The precision policy (`--precision auto|fp32|bf16`): `auto` is bf16 where the device has native
bf16 matrix units (any CUDA GPU with bf16 support; a CPU with AMX-BF16 or AVX512-BF16) and fp32
elsewhere. On a CPU without them, bf16 products are emulated and slower than fp32, so `auto`
never picks bf16 there. The reason is reported, since the CPU model changes between machines.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .errors import OverfillError

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names, best first
AUTO_PRECISION_HELP = ("auto: bf16 where the device has native bf16 matrix units (CUDA, AMX or AVX512-BF16 CPUs), "
                       "else fp32")


def pick_device(name: str) -> torch.device:
    """`auto` (cuda if present), or a torch device name, checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise OverfillError(f"bad device '{name}': {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OverfillError(f"device '{name}' asked for, but torch finds no CUDA GPU here (use --device cpu)")
    return device


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo does not exist, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class PrecisionChoice:
    """What a run computes in, and why; recorded in every run's config and metrics."""

    name: Literal["fp32", "bf16"]
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def as_dict(self) -> dict:
        return {"precision": self.name, "precision_reason": self.reason}


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` multiplies bf16 matrices in hardware, and the evidence."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA {torch.cuda.get_device_name(device)}: bf16 {'supported' if ok else 'not supported'}"
    if device.type == "cpu":
        found = [f for f in CPU_BF16_FLAGS if f in cpu_flags()]
        if found:
            return True, f"CPU {cpu_model()} has {', '.join(found)}"
        return False, f"CPU {cpu_model()} has neither {' nor '.join(CPU_BF16_FLAGS)}"
    return False, f"device type {device.type}: bf16 support unknown"


def resolve_precision(precision: str, device: torch.device) -> PrecisionChoice:
    """The policy: auto -> bf16 where native, else fp32; fp32/bf16 as asked (bf16 warned where emulated)."""
    if precision not in PRECISIONS:
        raise OverfillError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    native, evidence = native_bf16(device)
    if precision == "auto":
        return PrecisionChoice("bf16" if native else "fp32", f"auto: {evidence}")
    note = "" if precision == "fp32" or native else " (emulated: expect it slower than fp32)"
    return PrecisionChoice(precision, f"asked for; {evidence}{note}")


def default_dtype(device: torch.device) -> torch.dtype:
    """Inference dtype where no precision was asked for: bf16 on GPU, fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def describe_machine(device: torch.device) -> dict:
    """The facts a benchmark result needs beside its numbers."""
    import os
    import platform

    facts = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
             "threads": torch.get_num_threads(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
             "cpu_bf16_flags": [f for f in CPU_BF16_FLAGS if f in cpu_flags()]}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts
