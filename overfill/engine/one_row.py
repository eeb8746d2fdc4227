"""bf16 products of a decode step's few rows on CPUs with AVX512-BF16 (`one_row.cpp`).

A decode step multiplies 1-8 rows by each weight matrix: memory-bound work that should stream
the weight once at memory speed. On a CPU in bf16 neither library path does: oneDNN's bf16 GEMV
(`F.linear`) and inductor's own one-row reductions reach 25-36 % of the bandwidth floor on the
decoder's 0.3-1 MB products, where MKL's fp32 GEMV reaches 85-100 %
(benchmarks/latency/results/one_row_products_cpu.json). The kernel loads each weight row once,
dots it with every input row with `vdpbf16ps` (fp32 accumulation, one bf16 rounding of the
result, as `F.linear`) and splits the rows between threads. It is a `torch.ops.overfill` op
with a fake implementation, so the compiled decode step calls it from inside its graph.

OVERFILL_ONE_ROW_KERNEL=1 turns it on (off by default: see `requested`). It is built on first use by
torch's C++ extension loader (about a minute, then cached under ~/.cache/torch_extensions); where
the CPU lacks AVX512-BF16 or the build fails, the products stay `F.linear` and nothing else changes.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

import torch

from ..device import cpu_flags

MAX_ROWS = 4  # routed rows (one_row.cpp takes up to 8): at 8 rows oneDNN's AMX GEMM is faster on wide products
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
log = logging.getLogger(__name__)
_held_off = 0  # `off()` nesting depth


def supported() -> tuple[bool, str]:
    """Whether this machine can run the kernel, and why not."""
    missing = [f for f in REQUIRED_FLAGS if f not in cpu_flags()]
    if missing:
        return False, f"the CPU lacks {', '.join(missing)}"
    return True, ""


@functools.cache
def load() -> bool:
    """Build (or take from the cache) and register `torch.ops.overfill.one_row_linear`; False if unavailable."""
    ok, why = supported()
    if not ok:
        log.info("bf16 one-row kernel not used: %s", why)
        return False
    if not hasattr(torch.ops.overfill, "one_row_linear"):
        from torch.utils.cpp_extension import load as build

        try:
            build(name="overfill_one_row", sources=[str(Path(__file__).with_name("one_row.cpp"))],
                  extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=False)
        except Exception as e:  # no compiler or ninja: the library products still work
            log.warning("bf16 one-row kernel not built (%s): decode products stay F.linear", str(e).splitlines()[0])
            return False

        @torch.library.register_fake("overfill::one_row_linear")
        def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return x.new_empty(*x.shape[:-1], weight.shape[0])
    return True


def requested() -> bool:
    """The kernel is opt-in (OVERFILL_ONE_ROW_KERNEL=1): in the whole compiled step it has not beaten
    inductor's fused reductions yet (benchmarks/README.md), though each product alone runs ~2x faster."""
    return os.environ.get("OVERFILL_ONE_ROW_KERNEL", "0") == "1"


def enabled() -> bool:
    """Whether the engine routes its bf16 CPU products here: asked for, built, not held `off()`."""
    return _held_off == 0 and requested() and load()


@contextlib.contextmanager
def off():
    """Products on `F.linear` within, for an A/B in one process (the compiled step recompiles: its
    graph is keyed on the model's kernel setting)."""
    from ..model import _ONE_ROW_KERNEL, use_one_row_kernel

    global _held_off
    saved, _held_off = _ONE_ROW_KERNEL, _held_off + 1
    use_one_row_kernel()
    try:
        yield
    finally:
        _held_off -= 1
        use_one_row_kernel(*(saved or ()))


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] (at most MAX_ROWS rows) @ weight [N, K]^T -> [..., N], bf16 on the CPU; needs `load()`."""
    return torch.ops.overfill.one_row_linear(x, weight)
