"""bf16 decode steps on CPUs with AVX512-BF16 (`one_row.cpp`): a layer stack and a one-row product.

A decode step multiplies 1-8 rows by each weight matrix: memory-bound work that should stream
the weight once at memory speed. On a CPU in bf16 neither library path does: oneDNN's bf16 GEMV
(`F.linear`) and inductor's own one-row reductions reach 25-36 % of the bandwidth floor on the
decoder's 0.3-1 MB products, where MKL's fp32 GEMV reaches 85-100 %
(benchmarks/latency/results/one_row_products_cpu.json). Three ops, built from one loop that loads
each weight row once and dots it with every input row (`vdpbf16ps`, fp32 accumulation, one bf16
rounding of the result, as `F.linear`), prefetching the rows two blocks ahead:

- `one_row_linear(x, weight)`: one product, its rows split between threads; a `torch.ops.overfill`
  op with a fake implementation, so that a compiled step can call it from inside its graph.
- `one_row_logits(x, weight)`: the same, with the fp32 sums as they are (the output layer).
- `decode_layers(...)` (`LayerStack`): all layers of a decode step in one parallel region, the
  threads splitting every product and the attention heads, a barrier between dependent phases.
  Per step that is ~180 barriers instead of ~400 library calls or inductor kernels, each with a
  fork and join of the threads: the decoder's step runs about twice as fast as inductor's
  (benchmarks/README.md), without compiling anything.

On by default where the CPU has AVX512-BF16; OVERFILL_ONE_ROW_KERNEL=0 (or off, false, no) turns both off. They are
built by torch's C++ extension loader on first use, or ahead of time by `scripts/install.sh`
(about a minute, said on the terminal, then cached under $OVERFILL_CACHE/kernels/ per source,
compiler and torch); a failed build is remembered with its reason until one of those changes, and
a lock left by an interrupted build is removed. Where the CPU lacks the instructions or the build
fails, the step stays layer by layer on `F.linear` and nothing else changes.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from pathlib import Path

import torch

from ..device import cpu_flags
from ..errors import OverfillError, capped

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
        if not _build():
            return False

        @torch.library.register_fake("overfill::one_row_linear")
        def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return x.new_empty(*x.shape[:-1], weight.shape[0])
    return True


SOURCE = Path(__file__).with_name("one_row.cpp")
FAILED_FILE = "failed.json"  # a failed build's reason, kept until the source or the compiler changes


def build_dir() -> Path:
    """Where this source, built by this compiler for this torch, lives: a new key means a new build."""
    import hashlib
    import subprocess

    from ..hub import cache_dir

    try:
        compiler = subprocess.run(["c++", "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        compiler = "no c++"
    key = hashlib.sha256(SOURCE.read_bytes() + compiler.encode() + torch.__version__.encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"one_row-{key}"


def _build() -> bool:
    """Compile and load the ops once per source x compiler x torch, saying so; False (remembered) if that fails."""
    from torch.utils.cpp_extension import load as torch_load

    where = build_dir()
    failed = where / FAILED_FILE
    if failed.is_file():
        log.warning("bf16 layer stack not used: its build failed before (%s; delete %s to retry)",
                    capped(failed.read_text().strip(), 300), where)
        return False
    try:
        where.mkdir(parents=True, exist_ok=True)
        _remove_stale_lock(where)
        built = any(where.glob("*.so"))
        if not built:
            print(f"building the bf16 layer stack ({SOURCE.name}) in {where}: about a minute, once", flush=True,
                  file=sys.stderr)
        (where / "builder.pid").write_text(str(os.getpid()))
        torch_load(name="overfill_one_row", sources=[str(SOURCE)], build_directory=str(where),
                   extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=False)
        return True
    except Exception as e:  # no compiler, no ninja, a compile error: the library products still work
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("bf16 layer stack not built (%s): decode steps stay layer by layer", capped(reason, 300))
        try:
            failed.write_text(reason + "\n")
        except OSError:
            pass  # an unwritable cache: the build is retried next time, which is all that is lost
        return False


def _remove_stale_lock(where: Path) -> None:
    """torch's loader waits forever on a `lock` file left by a build that was killed (Ctrl-C): remove it when
    the process that took it is gone."""
    lock, pid_file = where / "lock", where / "builder.pid"
    if not lock.exists():
        return
    try:
        os.kill(int(pid_file.read_text()), 0)
        return  # its builder is alive: wait for it, as torch does
    except (OSError, ValueError):
        pass
    log.warning("removing the stale build lock %s (its build was interrupted)", lock)
    print(f"removing the stale build lock {lock} (an earlier build was interrupted)", file=sys.stderr)
    lock.unlink(missing_ok=True)


ENV_SWITCH = "OVERFILL_ONE_ROW_KERNEL"
SWITCH_VALUES = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False,
                 "no": False}
"""The spellings $OVERFILL_ONE_ROW_KERNEL takes, any case, spaces around; unset or empty: on."""


def requested() -> bool:
    """Whether the kernels are wanted: yes unless $OVERFILL_ONE_ROW_KERNEL turns them off. Any
    other value is refused: a misspelt "off" must not leave them on unnoticed."""
    value = os.environ.get(ENV_SWITCH, "").strip().lower()
    if not value:
        return True
    if value not in SWITCH_VALUES:
        raise OverfillError(f"{ENV_SWITCH}={capped(os.environ[ENV_SWITCH])!r} is not a switch: give one of "
                            f"{', '.join(SWITCH_VALUES)} (any case)")
    return SWITCH_VALUES[value]


def enabled() -> bool:
    """Whether the engine routes its bf16 CPU products here: asked for, built, not held `off()`."""
    return _held_off == 0 and requested() and load()


def why_off() -> str:
    """Why `enabled()` is False, in words."""
    ok, why = supported()
    if not ok:
        return why
    if not requested():
        return "OVERFILL_ONE_ROW_KERNEL turns it off"
    if _held_off:
        return "held off for an A/B"
    return "" if load() else "its build failed (see the warning above)"


@contextlib.contextmanager
def off():
    """Decode steps layer by layer on `F.linear` within, for an A/B in one process (a compiled step
    recompiles: its graph is keyed on the model's kernel setting)."""
    from .. import model

    global _held_off
    saved, _held_off = (model._ONE_ROW_KERNEL, model._DECODE_LAYERS), _held_off + 1
    model.use_one_row_kernel()
    model.use_decode_layers()
    try:
        yield
    finally:
        _held_off -= 1
        model.use_one_row_kernel(*(saved[0] or ()))
        model.use_decode_layers(saved[1])


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] (at most 8 rows) @ weight [N, K]^T -> [..., N], bf16 on the CPU; needs `load()`."""
    return torch.ops.overfill.one_row_linear(x, weight)



class LayerStack:
    """A decode step's layers in one call of `torch.ops.overfill.decode_layers` (`one_row.cpp`): the
    threads split every product and the attention heads inside one parallel region, so a layer
    costs a few barriers instead of a dozen library calls, and no compile is needed."""

    def supports(self, model, rows: int) -> bool:
        """Llama / Mistral / Qwen2 / Qwen3 layers (not an o_proj bias) with fused projections, bf16 on
        the CPU, head size a multiple of 16 (at most 512), 1-8 rows; else the step stays layer by layer."""
        a = model.args
        first = model.model.layers[0]
        # at 16 rows inductor's step is faster (the stack's products do 16x the arithmetic per byte)
        return (1 <= rows <= 8 and not a.o_bias and a.head_dim % 16 == 0
                and a.head_dim <= 512 and first.self_attn.is_fused and first.mlp.is_fused
                and first.mlp.down_proj.weight.dtype == torch.bfloat16
                and first.mlp.down_proj.weight.device.type == "cpu")

    def __call__(self, model, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_cache,
                 slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x `[B, 1, d]` (embedded), rope's cos/sin `[B, 1, D]`, mask `[B, 1, 1, S]`, slots `[1]` -> the
        residual stream `[B, 1, d]` after the last layer; this step's K/V go into `kv_cache`."""
        a = model.args
        weights = []
        for layer in model.model.layers:  # through the modules' dicts: nn.Module.__getattr__ would cost 0.25 ms a step
            mods = layer._modules
            attn, mlp = mods["self_attn"], mods["mlp"]
            weights += [mods["input_layernorm"]._parameters["weight"], attn._buffers["fused_weight"],
                        attn._modules["o_proj"]._parameters["weight"],
                        mods["post_attention_layernorm"]._parameters["weight"], mlp._buffers["fused_weight"],
                        mlp._modules["down_proj"]._parameters["weight"]]
            if a.qkv_bias:
                weights.append(attn._buffers["fused_bias"])
            if a.qk_norm:
                weights += [attn._modules["q_norm"]._parameters["weight"], attn._modules["k_norm"]._parameters["weight"]]
        B = x.shape[0]
        cos, sin = (t.reshape(B, -1).contiguous() for t in rope)  # [B, D]
        y = torch.ops.overfill.decode_layers(x.reshape(B, -1), weights, kv_cache.k, kv_cache.v, cos, sin,
                                             mask.reshape(B, -1).contiguous(), int(slots[0]),
                                             a.num_attention_heads, a.num_key_value_heads, a.rms_norm_eps,
                                             a.qkv_bias, a.qk_norm)
        return y.view(B, 1, -1)

    def logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer of the step: hidden `[B, 1, d]` -> fp32 logits `[B, 1, V]`. Rounded to bf16,
        logits of ~15 are 0.06 apart, and ties decide greedy tokens."""
        return torch.ops.overfill.one_row_logits(hidden, model.lm_head.weight)


LAYER_STACK = LayerStack()
