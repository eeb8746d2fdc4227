"""The two-stage step, shared by every batcher:

    prefill(full, kv_cache, prompt)                  -> logits of the last slot (full model)
    kv_cache.select_layers(layer_map)                -> the hand-off (no copy)
    decode_one_token(decoder, kv_cache, token, ...)  -> next token, sampled inside the step
    refresh(full, kv_cache, tokens, ...)             -> the full model rewrites decoded tokens' K/V
"""
from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..hub import cache_dir
from ..kv_cache import KVCache
from ..model import (Transformer, causal_mask, decodes_with_layer_stack, positions_from_padding, use_decode_layers,
                     use_one_row_kernel)
from . import one_row
from .sampling import Sampler, SamplingParams, sample

log = logging.getLogger(__name__)

_ONE_ROW_MAX_WIDTH = 1 << 24
_RECOMPILE_LIMIT = 64
"""Far above the graphs `CompiledStep` makes (2 of `decode_step`, 4 of `sample`), which torch's default of 8
would also hold: room for another engine's static shapes in the same process (`bench`)."""


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device, left: bool = True
             ) -> tuple[Tensor, Tensor]:
    """Token ids `[B, T]` and their mask `[B, T]` (long, 1 = real), padded on the left (or the right)."""
    T = max((len(s) for s in seqs), default=0)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        cols = slice(T - len(s), T) if left else slice(0, len(s))
        tokens[b, cols] = torch.tensor(list(s), dtype=torch.long)
        mask[b, cols] = 1
    return tokens.to(device), mask.to(device)


def prefill(full: Transformer, kv_cache: KVCache, tokens: Tensor, attention_mask: Tensor) -> Tensor:
    """Run the prompt `[B, T]` through the full model into slots 0..T-1; logits `[B, V]` of the last slot."""
    T = tokens.shape[1]
    slots = torch.arange(T, device=tokens.device)
    kv_cache.valid[:, :T] = attention_mask.bool()
    mask = causal_mask(kv_cache.valid[:, :T], slots)  # [B, 1, T, T]
    positions = positions_from_padding(attention_mask)  # [B, T]
    return full(tokens, positions, mask, kv_cache, slots, kv_len=T, last_only=True)[:, -1]


def decode_step(decoder: Transformer, kv_cache: KVCache, token: Tensor, position: Tensor, slot: Tensor,
                kv_len: int | None = None) -> Tensor:
    """One token per row: token, position `[B, 1]`, slot `[1]` -> logits `[B, V]`.

    With kv_len=None every step has the same shapes (attention over all S_max slots,
    future ones masked), which compiled and CUDA-graph steps need; eager decoding passes
    kv_len to attend over the filled slots only.
    """
    kv_cache.valid.index_fill_(1, slot, True)
    valid = kv_cache.valid if kv_len is None else kv_cache.valid[:, :kv_len]
    mask = causal_mask(valid, slot)  # [B, 1, 1, S]
    return decoder(token, position, mask, kv_cache, slot, kv_len=kv_len)[:, -1]


def decode_one_token(decoder: Transformer, kv_cache: KVCache, token: Tensor, position: Tensor, slot: Tensor,
                     kv_len: int | None, sampler: Sampler | None) -> Tensor:
    """`decode_step`, then each row's next token `[B]`, sampled on the device."""
    logits = decode_step(decoder, kv_cache, token, position, slot, kv_len)  # [B, V]
    return sample(logits, sampler, position[:, 0] + 1)


def first_token(full: Transformer, kv_cache: KVCache, tokens: Tensor, attention_mask: Tensor,
                sampler: Sampler | None) -> Tensor:
    """The prefill and each row's first new token `[B]`."""
    logits = prefill(full, kv_cache, tokens, attention_mask)  # [B, V]
    return sample(logits, sampler, attention_mask.sum(-1))


def refresh(full: Transformer, kv_cache: KVCache, tokens: Tensor, positions: Tensor, first_slot: int) -> None:
    """Let the full model re-process decoded tokens `[B, K]`, overwriting their K/V in every layer."""
    K = tokens.shape[1]
    slots = torch.arange(first_slot, first_slot + K, device=tokens.device)
    kv_len = first_slot + K
    mask = causal_mask(kv_cache.valid[:, :kv_len], slots)  # [B, 1, K, S]
    full.hidden(tokens, positions, mask, kv_cache, slots, kv_len=kv_len, last_only=True)


def refresh_due(steps: int, every: int) -> bool:
    """Whether the step just taken (the `steps`-th) ends a refresh window of `every` tokens."""
    return every > 0 and steps % every == 0


def finish_reason(token: int, params: SamplingParams, eos_ids: set[int], generated: int, max_new: int) -> str | None:
    """Why a row ends with this, its `generated`-th token: "stop" (EOS, not part of the output),
    "length", or None."""
    if token in eos_ids and not params.ignore_eos:
        return "stop"
    return "length" if generated >= max_new else None


class CompiledStep:
    """`decode_one_token` through torch.compile, in a set of graphs that is bounded by design.

    Two functions are compiled, so that the sampling settings do not multiply the decoder's graphs:

    - `decode_step`, to logits, with kv_len=None (attention over every cache slot). The cache length
      is a symbolic size (`mark_cache`), and so is the row count from 2 rows on: 2 graphs in all,
      "1 row" and "2+ rows" (torch specializes sizes 0 and 1 anyway; at 1 row inductor's
      decompose_mm_pass turns the products into reductions that stream the weights).
    - `sample`, for sampled steps: one graph per kind ("temperature", "filtered") and row class.
      A greedy step needs none: it takes the argmax eagerly, one op.

    So a step of each sampling kind at 1 row and at 2 rows makes every graph a step can need,
    whatever the batch, the cache length or the sampling settings: `ContinuousBatcher.warm_up`.

    On a GPU, mode="reduce-overhead" replays the decoder's step as a CUDA graph (one recording per
    row count and cache length). On a CPU, inductor fuses the many small element-wise kernels; its
    C++ wrapper calls the kernels without Python: 2-4 % off the decoder's bf16 step on a 2-core AMX
    Xeon (benchmarks/README.md), for some 25 s more of compile time. A step that the bf16 layer
    stack runs (`model.decodes_with_layer_stack`, engine/one_row.py) is not compiled: the stack is
    one C++ call already, and twice as fast as inductor's step.

    A graph that fails to compile or to run harms no request: the step runs eagerly
    (`decode_step` / `sample`), and so does every later step that needs that graph; the failure is
    logged once.
    """

    def __init__(self, device_type: str):
        use_compile_cache()
        self.graphs = _compiled_graphs(device_type)
        self.failed: set[tuple] = set()
        """Keys of the graphs that failed: ("decode", row class) or ("sample", row class, kind)."""
        self._thread = threading.local()
        _count_compiles()

    def __call__(self, decoder: Transformer, kv_cache: KVCache, token: Tensor, position: Tensor, slot: Tensor,
                 kv_len: int | None, sampler: Sampler | None) -> Tensor:
        """As `decode_one_token`; `kv_len` (the filled slots) is for the eager fallback only."""
        rows = token.shape[0]
        if decodes_with_layer_stack(decoder, rows):
            return decode_one_token(decoder, kv_cache, token, position, slot, kv_len, sampler)
        self._raise_recompile_limit()
        row_class = row_class_of(rows)
        if rows > 1:
            mark_rows(token, position)
        logits = self._run(("decode", row_class),  # [B, V]
                           lambda: self.graphs.decode(decoder, kv_cache, token, position, slot),
                           lambda: decode_step(decoder, kv_cache, token, position, slot, kv_len))
        if sampler is None or sampler.kind == "greedy":
            return logits.argmax(-1)
        counter = position[:, 0] + 1
        return self._run(("sample", row_class, sampler.kind), lambda: self.graphs.sample(logits, sampler, counter),
                         lambda: sample(logits, sampler, counter))

    def _run(self, key: tuple[str, ...], graph: Callable[[], Tensor], eager: Callable[[], Tensor]) -> Tensor:
        """The compiled graph's result, or the eager one where the graph failed (now or before).

        Running a step again is safe: it writes the same K/V and valid bit into the same slot."""
        if key not in self.failed:
            try:
                return graph()
            except Exception as e:  # a compile error, the recompile limit, a failing kernel: go on eagerly
                self.failed.add(key)
                log.warning("the compiled %s graph (%s) failed, so it runs eagerly from now on: %s",
                            key[0], ", ".join(key[1:]), root_cause(e))
                log.debug("the compiled graph's failure", exc_info=True)
        return eager()

    def _raise_recompile_limit(self) -> None:
        """torch's dynamo settings are per thread: lift the limit on the thread that compiles, once."""
        if not getattr(self._thread, "ready", False):
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, _RECOMPILE_LIMIT)
            self._thread.ready = True


def root_cause(error: BaseException) -> str:
    """The innermost cause of an error, in one short line (dynamo wraps the backend's errors in its own)."""
    while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
        error = inner
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line[:300]}"


ROW_CLASSES = ("1 row", "2+ rows")
"""Steps of a row class share their graphs."""


def row_class_of(rows: int) -> str:
    return ROW_CLASSES[rows > 1]


def mark_rows(*tensors: Tensor) -> None:
    """Let dim 0 (rows) of step inputs be a symbolic size, so that one graph serves 2 rows and more."""
    for t in tensors:
        torch._dynamo.mark_dynamic(t, 0)


def mark_cache(cache: KVCache) -> None:
    """Mark a KV cache (or a view of its first rows) as the compiled step's input: static buffers
    (updated in place, CUDA graphs replay over them) whose length, and from 2 rows on row count, are
    symbolic sizes, so that the cache can grow without a compile."""
    for buffer in cache.k + cache.v + [cache.valid]:
        torch._dynamo.mark_static_address(buffer)
        torch._dynamo.mark_dynamic(buffer, 2 if buffer.dim() == 4 else 1)  # [B, H, S, D] or [B, S]
        if buffer.shape[0] > 1:
            torch._dynamo.mark_dynamic(buffer, 0)


@dataclass(frozen=True)
class _Graphs:
    decode: Callable
    sample: Callable


@functools.cache
def _compiled_graphs(device_type: str) -> _Graphs:
    """The compiled functions, one pair per device type for the process (their graphs are shared)."""
    if device_type == "cuda":
        decode = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
        return _Graphs(decode, torch.compile(sample, fullgraph=True, dynamic=True))
    # The sampler's few kernels gain nothing from the C++ wrapper, and compile in two thirds of the time without.
    decode = torch.compile(decode_step, fullgraph=True, dynamic=False,
                           options=one_row_product_options() | {"cpp_wrapper": True})
    return _Graphs(decode, torch.compile(sample, fullgraph=True, dynamic=True))


def compile_count() -> int:
    """Graphs that torch.compile has compiled (or tried to) in this process, on any thread."""
    return _compiles_seen


_compiles_seen = 0


@functools.cache
def _count_compiles() -> None:
    """Count dynamo's compiles (`compile_count`) from now on, through its compile-end hook."""
    def counted(args) -> None:
        global _compiles_seen
        if args.callback_trigger == torch._dynamo.callback.CallbackTrigger.DYNAMO:
            _compiles_seen += 1

    torch._dynamo.callback.callback_handler.register_end_callback(counted)


def one_row_product_options() -> dict:
    """inductor options under which one-row products (CPU decoding) become its own streaming reductions."""
    # The pass reads its width limit (2048) once, at import; lift it so that the output
    # layer, as wide as the vocabulary, streams too. The option also keys the compile cache.
    from torch._inductor.fx_passes import decompose_mem_bound_mm

    decompose_mem_bound_mm.cpu_max_other_dimension_decomposition = _ONE_ROW_MAX_WIDTH
    limit = {"cpu_max_other_dimension_decomposition": _ONE_ROW_MAX_WIDTH}
    return {"post_grad_fusion_options": {"decompose_mm_pass": limit}}


def prepare_for_decoding(*models: Transformer, compile: bool) -> None:
    """Ready the models for the engine's decode steps. On a CPU in bf16 where the kernels are on
    (`one_row.enabled()`), compiled or not: the steps' layers through the layer stack, their other
    few-row products through the one-row kernel. There, and for any compiled step, q/k/v and
    gate/up as one product each (no copy, parameter names unchanged)."""
    weights = [next(m.parameters()) for m in models]
    kernels = all(stack_applies(w.device, w.dtype) for w in weights) and one_row.enabled()
    if compile or kernels:
        for m in models:
            m.fuse_projections()
    if kernels:
        use_one_row_kernel(one_row.linear, one_row.MAX_ROWS)
        use_decode_layers(one_row.LAYER_STACK)


def stack_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode steps of weights on `device` in `dtype` are the bf16 layer stack's to run (where it is on)."""
    return device.type == "cpu" and dtype == torch.bfloat16


def decode_path(device: torch.device, dtype: torch.dtype) -> str:
    """How `prepare_for_decoding` will have the decode steps run, in words (printed once by generate and serve)."""
    if not stack_applies(device, dtype):
        return "decode steps layer by layer"
    if one_row.enabled():
        return "decode steps through the CPU bf16 layer stack"
    return f"decode steps layer by layer (the bf16 layer stack is off: {one_row.why_off()})"


def cache_len(n: int, static: bool) -> int:
    """Cache slots for n tokens; static shapes round up, so that fewer lengths each need a CUDA graph recording."""
    return -(-n // 256) * 256 if static else n


def use_compile_cache() -> str | None:
    """Keep inductor's compiled graphs (its FX graph cache) under overfill's cache, `compile/`, so that a later
    start finds them, rather than under /tmp (torch's default, which torch writes to $TORCHINDUCTOR_CACHE_DIR once
    it has looked). A directory the user set wins. The directory in use, or None where ours cannot be made."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        path = cache_dir() / "compile"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.warning("compiled graphs are not kept for the next start: cannot make %s (%s)", path, e.strerror or e)
            return None
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]
