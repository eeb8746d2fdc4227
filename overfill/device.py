"""Device and precision selection: the one place that decides where and in what dtype we compute.

The precision policy (`--precision auto|fp32|bf16`): `auto` is bf16 where bf16 products are
faster than fp32 and fp32 elsewhere. On CUDA that is any GPU with bf16 support. On a CPU the flags
are necessary but not sufficient: an AVX512-BF16 EPYC trained 1.9x faster in bf16, an AMX Xeon
ran bf16 products 7x faster, but a Xeon with AVX512-BF16 and no AMX ran them 0.78x as fast as
fp32 (and trained 1.85x slower). So on a CPU with bf16 flags `auto` times one matrix product in
both dtypes (about 0.3 s, once per process) and takes bf16 only where it wins by
`CPU_BF16_MIN_SPEEDUP`. The reason is reported, since the CPU model changes between machines.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .errors import OverfillError, capped

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names, best first
CPU_BF16_MIN_SPEEDUP = 1.1  # bf16 / fp32 products per second that `auto` needs on a CPU
AUTO_PRECISION_HELP = ("auto: bf16 where bf16 products are faster than fp32 (CUDA; a CPU with AMX or AVX512-BF16 "
                       "where a timed product confirms it), else fp32")


def pick_device(name: str) -> torch.device:
    """`auto` (cuda if present), or a torch device name, checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise OverfillError(f"bad device '{capped(name)}': {capped(str(e))}") from None
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


def cpu_caches(root: str = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, int]:
    """Data and unified cache sizes of the first CPU in bytes, {"L1": ..., "L2": ..., "L3": ...}, as
    sysfs reports them (a VM may show a last-level cache larger than a small model); {} where unknown."""
    sizes = {}
    for index in sorted(Path(root).glob("index*")):
        try:
            level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction" and size[:-1].isdigit():
            sizes[f"L{level}"] = int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}.get(size[-1], 1)
    return sizes


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
        if not found:
            return False, f"CPU {cpu_model()} has neither {' nor '.join(CPU_BF16_FLAGS)}"
        speedup = cpu_bf16_speedup(torch.get_num_threads())
        verdict = "faster" if speedup >= CPU_BF16_MIN_SPEEDUP else "not faster"
        return (speedup >= CPU_BF16_MIN_SPEEDUP,
                f"CPU {cpu_model()} has {', '.join(found)}; a bf16 product ran {speedup:.2f}x fp32 ({verdict})")
    return False, f"device type {device.type}: bf16 support unknown"


@functools.cache
def cpu_bf16_speedup(threads: int, rounds: int = 3) -> float:
    """bf16 over fp32 speed of a training-sized product (`[512, 576] @ [576, 1536]`) on this CPU.

    The two dtypes alternate and each keeps its best round, so a busy machine slows both alike.
    `threads` is part of the cache key: the ratio depends on it.
    """
    import time

    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    operands = {dtype: (a.to(dtype), b.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    best = {dtype: float("inf") for dtype in operands}
    for _ in range(rounds):
        for dtype, (x, y) in operands.items():
            x @ y  # warm-up: oneDNN picks and caches its kernel on the first call
            start = time.perf_counter()
            for _ in range(4):
                x @ y
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] / best[torch.bfloat16]


def resolve_precision(precision: str, device: torch.device) -> PrecisionChoice:
    """The policy: auto -> bf16 where it is faster, else fp32; fp32/bf16 as asked (slow bf16 flagged)."""
    if precision not in PRECISIONS:
        raise OverfillError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    native, evidence = native_bf16(device)
    if precision == "auto":
        return PrecisionChoice("bf16" if native else "fp32", f"auto: {evidence}")
    note = "" if precision == "fp32" or native else " (expect it slower than fp32 here)"
    return PrecisionChoice(precision, f"asked for; {evidence}{note}")


INFERENCE_PRECISION_HELP = "weights and KV cache; " + AUTO_PRECISION_HELP



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
