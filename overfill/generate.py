"""Two-stage generation: the full model prefills, the decoder generates.

    prefill(full, kv_cache, prompt)        -> first token (full model, logits of the last slot only)
    kv_cache.select_layers(layer_map)      -> the hand-off (no copy)
    decode_step(decoder, kv_cache, token)  -> next token, one fixed-shape step at a time

`BatchDecoder` owns the cache and runs that loop for a left-padded batch; `generate`
and `stream` add text: chat templates, EOS and stop strings, incremental detokenisation.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor

from .errors import OverfillError
from .device import INFERENCE_PRECISION_HELP, inference_precision, pick_device
from .kv_cache import KVCache
from .model import Transformer, causal_mask, positions_from_padding
from .two_stage import TwoStageModel


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p (1: all)."""
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> "SamplingParams":
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise OverfillError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 100:
            raise OverfillError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise OverfillError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise OverfillError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise OverfillError("stop strings must be non-empty")
        return self


# ---------------------------------------------------------------------------- the hot path

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
    future ones masked), which is what CUDA-graph capture needs; eager CPU decoding
    passes kv_len to attend over the filled slots only.
    """
    kv_cache.valid.index_fill_(1, slot, True)
    valid = kv_cache.valid if kv_len is None else kv_cache.valid[:, :kv_len]
    mask = causal_mask(valid, slot)  # [B, 1, 1, S]
    return decoder(token, position, mask, kv_cache, slot, kv_len=kv_len)[:, -1]


def refresh(full: Transformer, kv_cache: KVCache, tokens: Tensor, positions: Tensor, first_slot: int) -> None:
    """Let the full model re-process decoded tokens `[B, K]`, overwriting their K/V in every layer."""
    K = tokens.shape[1]
    slots = torch.arange(first_slot, first_slot + K, device=tokens.device)
    kv_len = first_slot + K
    mask = causal_mask(kv_cache.valid[:, :kv_len], slots)  # [B, 1, K, S]
    full.hidden(tokens, positions, mask, kv_cache, slots, kv_len=kv_len, last_only=True)


def sample(logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]) -> Tensor:
    """Next token `[B]` per row, each row with its own settings; greedy rows take the argmax."""
    tokens = logits.argmax(-1)
    for b, p in enumerate(params):
        if p.temperature > 0:
            tokens[b] = _sample_row(logits[b].float(), p, generators[b])
    return tokens


def _sample_row(logits: Tensor, p: SamplingParams, generator: torch.Generator | None) -> Tensor:
    logits = logits / p.temperature  # [V]
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p.top_p  # keep the first token that reaches top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[0].to(logits.device)


_ONE_ROW_MAX_WIDTH = 1 << 24


@functools.cache
def compiled_decode_step(device_type: str) -> Callable:
    """`decode_step` through torch.compile, for static shapes (kv_len=None), one per device type.

    On a GPU, mode="reduce-overhead" replays the whole step as one CUDA graph. On a CPU,
    inductor fuses the many small element-wise kernels, and its "decompose_mm_pass" turns
    the one-row matrix products of batch-1 decoding into its own reductions, which stream
    the weights at memory speed where the BLAS GEMV (MKL on AMD CPUs) reaches about half of it.
    Its C++ wrapper calls the kernels without Python: 2-4 % off the decoder's bf16 step on a
    2-core AMX Xeon (benchmarks/README.md), for some 25 s more of compile time.
    """
    if device_type == "cuda":
        return torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return torch.compile(decode_step, fullgraph=True, dynamic=False,
                         options=one_row_product_options() | {"cpp_wrapper": True})


def one_row_product_options() -> dict:
    """inductor options under which one-row products (CPU decoding) become its own streaming reductions."""
    # The pass reads its width limit (2048) once, at import; lift it so that the output
    # layer, as wide as the vocabulary, streams too. The option also keys the compile cache.
    from torch._inductor.fx_passes import decompose_mem_bound_mm

    decompose_mem_bound_mm.cpu_max_other_dimension_decomposition = _ONE_ROW_MAX_WIDTH
    limit = {"cpu_max_other_dimension_decomposition": _ONE_ROW_MAX_WIDTH}
    return {"post_grad_fusion_options": {"decompose_mm_pass": limit}}


def _cache_len(n: int, static: bool) -> int:
    """Cache slots for n tokens; static shapes round up, so fewer lengths each need a compile."""
    return -(-n // 256) * 256 if static else n


# ---------------------------------------------------------------------------- the batch loop

class BatchDecoder:
    """The two-stage loop over a left-padded batch with a static KV cache.

    `first()` runs the prefill and returns the first tokens `[B]`; each `next()` runs
    one decode step. Rows that are done keep stepping (fixed shapes) and are ignored.
    """

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
        device, pad = model.device, model.tokenizer.pad_token_id
        B, T = len(prompts), max(lengths)
        self.tokens = torch.full((B, T), pad, dtype=torch.long, device=device)  # left-padded [B, T]
        self.attention_mask = torch.zeros((B, T), dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            self.tokens[b, T - len(p):] = torch.tensor(p, device=device)
            self.attention_mask[b, T - len(p):] = 1
        self.lengths = torch.tensor(lengths, device=device)[:, None]  # [B, 1]
        self.prompt_len = T
        n = max(self.max_new)
        self.kv_cache = model.full.new_kv_cache(B, _cache_len(T + n, compile))
        self.decoder_cache = self.kv_cache.select_layers(model.layer_map)
        self.generators = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in self.params]
        self.history = torch.empty((B, n), dtype=torch.long, device=device)  # fed tokens, for refresh
        # Step i's inputs, made once so that a step allocates nothing: its slot and positions.
        self.slots = torch.arange(T, T + n, device=device)  # [n]
        self.positions = self.lengths + torch.arange(n, device=device)  # [B, n]
        self.steps = 0
        self._static = compile
        self._step = compiled_decode_step(device.type) if compile else decode_step
        if compile:
            for m in (model.full, model.decoder):
                m.fuse_projections()  # q/k/v and gate/up as one product each (no copy, names unchanged)
            # The step writes into these buffers: CUDA graphs may replay over them in place.
            for buffer in self.kv_cache.k + self.kv_cache.v + [self.kv_cache.valid]:
                torch._dynamo.mark_static_address(buffer)

    @torch.inference_mode()
    def first(self) -> Tensor:
        logits = prefill(self.model.full, self.kv_cache, self.tokens, self.attention_mask)
        self.last = sample(logits, self.params, self.generators)  # [B]
        return self.last

    @torch.inference_mode()
    def next(self) -> Tensor:
        i, k = self.steps, self.refresh_every if self.model.is_two_stage else 0
        if k:
            self.history[:, i] = self.last
        if self._static:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed
        kv_len = None if self._static else self.prompt_len + i + 1
        logits = self._step(self.model.decoder, self.decoder_cache, self.last[:, None], self.positions[:, i:i + 1],
                            self.slots[i:i + 1], kv_len)
        self.steps += 1
        if k and self.steps % k == 0:
            first = self.steps - k
            refresh(self.model.full, self.kv_cache, self.history[:, first:self.steps],
                    self.positions[:, first:self.steps], self.prompt_len + first)
        self.last = sample(logits, self.params, self.generators)
        return self.last


# ---------------------------------------------------------------------------- text

@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    """"stop" (EOS or a stop string) or "length"."""
    prompt_tokens: int


class TextState:
    """One row's output text: EOS, stop strings and safe streaming pieces."""

    def __init__(self, tokenizer, params: SamplingParams, max_new: int, eos_ids: set[int], prompt_tokens: int):
        self.tokenizer, self.params, self.max_new, self.eos_ids = tokenizer, params, max_new, eos_ids
        self.prompt_tokens = prompt_tokens
        self.ids: list[int] = []
        self.text, self.emitted, self.finish_reason = "", 0, None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> str:
        """Take one token; return the text that can now be shown."""
        if token in self.eos_ids and not self.params.ignore_eos:
            return self._finish("stop")
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.params.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at >= 0:
                self.text, self.finish_reason = self.text[:at], "stop"
                return self._flush()
        if len(self.ids) >= self.max_new:
            return self._finish("length")
        return self._flush(hold=self._held_back())

    def _finish(self, reason: str) -> str:
        """End the text; a partial UTF-8 character at its end will never be completed, so it is dropped."""
        self.finish_reason = reason
        if self.text.endswith("\ufffd") and len(self.text) > self.emitted:
            self.text = self._without_partial_char()
        return self._flush()

    def _without_partial_char(self) -> str:
        """The text less its last 1-3 tokens if those decode to U+FFFD only (a partial character is at most 3
        bytes; some decoders give one U+FFFD for it, byte-fallback ones one per byte)."""
        for k in range(1, min(3, len(self.ids)) + 1):
            head = self.tokenizer.decode(self.ids[:-k], skip_special_tokens=True)
            if not head.endswith("\ufffd"):
                tail = self.text[len(head):]
                return head if self.text.startswith(head) and tail and set(tail) == {"\ufffd"} else self.text
        return self.text

    def _held_back(self) -> int:
        """Characters to keep back: a partial UTF-8 character or a possible stop-string start."""
        if self.text.endswith("\ufffd"):
            return len(self.text) - self.emitted
        held = 0
        for s in self.params.stop:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    held = max(held, n)
                    break
        return held

    def _flush(self, hold: int = 0) -> str:
        end = max(self.emitted, len(self.text) - hold)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece

    def completion(self) -> Completion:
        return Completion(self.text, self.ids, self.finish_reason or "length", self.prompt_tokens)


def encode(tokenizer, prompt: str | list[dict], chat: bool = True, system: str | None = None) -> list[int]:
    """Token ids of a prompt: a chat (list of messages) or a string (a user message if `chat`)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise OverfillError("empty prompt")
        if not chat or not tokenizer.chat_template:
            return tokenizer(prompt, add_special_tokens=True)["input_ids"]
        prompt = [{"role": "user", "content": prompt}]
    if not prompt:
        raise OverfillError("empty list of messages")
    if system is not None:
        prompt = [{"role": "system", "content": system}] + list(prompt)
    for m in prompt:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise OverfillError(f"a chat message needs 'role' and 'content': {m!r}")
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def stream_batch(model: TwoStageModel, prompt_ids: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams], refresh_every: int | None = None,
                 compile: bool = False) -> Iterator[tuple[int, str, TextState]]:
    """Yield `(row, new_text, state)` as rows produce text; every row ends with `state.done`."""
    params = [params] * len(prompt_ids) if isinstance(params, SamplingParams) else list(params)
    refresh_every = model.config.refresh_every if refresh_every is None else refresh_every
    loop = BatchDecoder(model, prompt_ids, params, refresh_every=refresh_every, compile=compile)
    eos = model.eos_token_ids
    states = [TextState(model.tokenizer, p, n, eos, len(ids)) for p, n, ids in zip(params, loop.max_new, prompt_ids)]
    tokens = loop.first()
    while True:
        for b, token in enumerate(tokens.tolist()):
            if not states[b].done:
                piece = states[b].add(token)
                if piece or states[b].done:
                    yield b, piece, states[b]
        if all(s.done for s in states):
            return
        tokens = loop.next()


def generate(model: TwoStageModel, prompts: Sequence[str | list[dict]],
             params: SamplingParams | Sequence[SamplingParams] | None = None, chat: bool = True,
             refresh_every: int | None = None) -> list[Completion]:
    """Complete a batch of prompts (strings or chats); one Completion per prompt, in order."""
    params = params or SamplingParams()
    ids = [encode(model.tokenizer, p, chat) for p in prompts]
    states: dict[int, TextState] = {}
    for row, _, state in stream_batch(model, ids, params, refresh_every):
        states[row] = state
    return [states[b].completion() for b in range(len(ids))]


def stream(model: TwoStageModel, prompt: str | list[dict], params: SamplingParams | None = None,
           chat: bool = True, refresh_every: int | None = None) -> Iterator[str]:
    """Text pieces of one completion as they are generated."""
    ids = [encode(model.tokenizer, prompt, chat)]
    for _, piece, _ in stream_batch(model, ids, params or SamplingParams(), refresh_every):
        if piece:
            yield piece


# ---------------------------------------------------------------------------- `overfill generate`

@dataclass
class GenerateArgs:
    prompt: str = field(metadata={"help": "the prompt (a user message unless --raw)", "positional": True})
    full: str = field(default="smollm2-135m-instruct", metadata={"help": "full model (prefill)"})
    decoder: str | None = field(default=None, metadata={
        "help": "decoder: an OverFill or pruned HF directory (default: the full model decodes alone)"})
    system: str | None = field(default=None, metadata={"help": "system message"})
    raw: bool = field(default=False, metadata={"help": "plain text prompt, no chat template"})
    max_new_tokens: int = field(default=256, metadata={"help": "maximum number of new tokens"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature; 0 is greedy"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0: off)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (1: off)"})
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling"})
    stop: list[str] = field(default_factory=list, metadata={"help": "stop strings"})
    stream: bool = field(default=False, metadata={"help": "print the text as it is generated"})
    refresh_every: int | None = field(default=None, metadata={
        "help": "let the full model re-process every K decoded tokens (default: the decoder's setting)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, ... (auto: cuda if available)"})
    precision: Literal["default", "auto", "fp32", "bf16"] = field(default="default", metadata={
        "help": INFERENCE_PRECISION_HELP})


def generate_command(args: GenerateArgs) -> None:
    device = pick_device(args.device)
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                            list(args.stop)).validate()
    if args.refresh_every is not None and args.refresh_every < 0:
        raise OverfillError("--refresh-every must be >= 0")
    dtype = inference_precision(args.precision, device).dtype
    model = TwoStageModel.from_refs(args.full, args.decoder, dtype=dtype, device=device)
    prompt: str | list[dict] = args.prompt
    if not args.raw and args.system is not None:
        prompt = [{"role": "system", "content": args.system}, {"role": "user", "content": args.prompt}]
    if args.stream:
        for piece in stream(model, prompt, params, chat=not args.raw, refresh_every=args.refresh_every):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(generate(model, [prompt], params, chat=not args.raw, refresh_every=args.refresh_every)[0].text)
