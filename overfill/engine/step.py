"""The two-stage step, shared by every batcher:

    prefill(full, kv_cache, prompt)                  -> logits of the last slot (full model)
    kv_cache.select_layers(layer_map)                -> the hand-off (no copy)
    decode_one_token(decoder, kv_cache, token, ...)  -> next token, sampled inside the step
    refresh(full, kv_cache, tokens, ...)             -> the full model rewrites decoded tokens' K/V
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..kv_cache import KVCache
from ..model import (Transformer, causal_mask, decodes_with_layer_stack, positions_from_padding, use_decode_layers,
                     use_one_row_kernel)
from . import one_row
from .sampling import Sampler, SamplingParams, sample

_ONE_ROW_MAX_WIDTH = 1 << 24
_RECOMPILE_LIMIT = 64
"""Compiled variants of the step: (rows, cache length, sampling kind) each give one."""


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


@functools.cache
def compiled_decode_one_token(device_type: str) -> Callable:
    """`decode_one_token` through torch.compile, for static shapes (kv_len=None), one per device type.

    On a GPU, mode="reduce-overhead" replays the whole step as one CUDA graph. On a CPU,
    inductor fuses the many small element-wise kernels, and its "decompose_mm_pass" turns
    the one-row matrix products of batch-1 decoding into its own reductions, which stream
    the weights at memory speed where the BLAS GEMV (MKL on AMD CPUs) reaches about half of it.
    Its C++ wrapper calls the kernels without Python: 2-4 % off the decoder's bf16 step on a
    2-core AMX Xeon (benchmarks/README.md), for some 25 s more of compile time. Sampling is
    in the graph, so a step ends with the tokens on the device and no host sync.

    A step that the bf16 layer stack runs (`model.decodes_with_layer_stack`, engine/one_row.py)
    is not compiled: the stack is one C++ call already, and twice as fast as inductor's step.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    if device_type == "cuda":
        return torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True, dynamic=False)
    compiled = torch.compile(decode_one_token, fullgraph=True, dynamic=False,
                             options=one_row_product_options() | {"cpp_wrapper": True})

    def step(decoder: Transformer, kv_cache: KVCache, token: Tensor, position: Tensor, slot: Tensor,
             kv_len: int | None, sampler: Sampler | None) -> Tensor:
        run = decode_one_token if decodes_with_layer_stack(decoder, token.shape[0]) else compiled
        return run(decoder, kv_cache, token, position, slot, kv_len, sampler)

    return step


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
    kernels = all(w.device.type == "cpu" and w.dtype == torch.bfloat16 for w in weights) and one_row.enabled()
    if compile or kernels:
        for m in models:
            m.fuse_projections()
    if kernels:
        use_one_row_kernel(one_row.linear, one_row.MAX_ROWS)
        use_decode_layers(one_row.LAYER_STACK)


def cache_len(n: int, static: bool) -> int:
    """Cache slots for n tokens; static shapes round up, so fewer lengths each need a compile."""
    return -(-n // 256) * 256 if static else n
