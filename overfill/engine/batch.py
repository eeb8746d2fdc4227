"""`BatchDecoder`: the two-stage loop over a fixed, left-padded batch with a static KV cache."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..errors import OverfillError
from ..two_stage import TwoStageModel
from .sampling import Sampler, SamplingParams, row_seed
from .step import (CompiledStep, cache_len, decode_one_token, first_token, left_pad, mark_cache, prepare_for_decoding,
                   refresh, refresh_due)


class BatchDecoder:
    """`first()` runs the prefill and returns the first tokens `[B]`; each `next()` runs one decode step.

    Decode step i writes slot `T + i` (T: the padded prompt length) of every row. Rows that are
    done keep stepping (fixed shapes) and are ignored.
    """

    @torch.inference_mode()  # its tensors are inference tensors, as the server's: one compiled graph for both
    def __init__(self, model: TwoStageModel, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                 refresh_every: int = 0, compile: bool = False):
        if not prompts:
            raise OverfillError("no prompts given")
        if any(len(p) == 0 for p in prompts):
            raise OverfillError("empty prompt")
        self.model, self.params, self.refresh_every = model, [p.validate() for p in params], refresh_every
        lengths = [len(p) for p in prompts]
        window = model.context_window
        if max(lengths) >= window:
            raise OverfillError(f"prompt of {max(lengths)} tokens does not fit the context window of {window}")
        self.max_new = [min(p.max_new_tokens, window - n) for p, n in zip(self.params, lengths)]
        device = model.device
        self.tokens, self.attention_mask = left_pad(prompts, model.tokenizer.pad_token_id, device)  # [B, T]
        B, T = self.tokens.shape
        self.prompt_len, n = T, max(self.max_new)
        self.kv_cache = model.full.new_kv_cache(B, cache_len(T + n, compile))
        self.decoder_cache = self.kv_cache.select_layers(model.layer_map)
        self.sampler = Sampler(self.params, [row_seed(p) for p in self.params], device)
        self.fed = torch.empty((B, n), dtype=torch.long, device=device)  # decoded tokens fed back, for refresh
        # Step i's inputs, made once so that a step allocates nothing: its slot and positions.
        self.slots = torch.arange(T, T + n, device=device)  # [n]
        # [n, B, 1]: step i's positions are contiguous whatever n is, so n does not key the compiled graph.
        first_positions = torch.tensor(lengths, device=device)  # [B]
        self.positions = (first_positions[None, :] + torch.arange(n, device=device)[:, None])[..., None]
        self.steps = 0
        self._static = compile
        self._graphs = compile and device.type == "cuda"
        self._step = CompiledStep(device.type) if compile else decode_one_token
        prepare_for_decoding(model.full, model.decoder, compile=compile)
        if compile:
            # CUDA graphs replay over these buffers in place; on a CPU the step is ~8 % faster with them
            # static too (bf16 decoder, 2-core AMX Xeon).
            mark_cache(self.kv_cache)

    @torch.inference_mode()
    def first(self) -> Tensor:
        self.last = first_token(self.model.full, self.kv_cache, self.tokens, self.attention_mask, self.sampler)  # [B]
        return self.last

    @torch.inference_mode()
    def next(self) -> Tensor:
        i, every = self.steps, self.refresh_every if self.model.is_two_stage else 0
        if every:
            self.fed[:, i] = self.last
        if self._static:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's tokens are consumed
        tokens = self._step(self.model.decoder, self.decoder_cache, self.last[:, None],
                            self.positions[i], self.slots[i:i + 1], self.prompt_len + i + 1, self.sampler)  # [B]
        self.last = tokens.clone() if self._graphs else tokens  # a CUDA graph's output is overwritten by its replay
        self.steps += 1
        if refresh_due(self.steps, every):
            first = self.steps - every
            refresh(self.model.full, self.kv_cache, self.fed[:, first:self.steps],
                    self.positions[first:self.steps, :, 0].T, self.prompt_len + first)
        return self.last
