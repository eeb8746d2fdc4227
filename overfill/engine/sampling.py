"""Sampling on the device, per row, without a host sync: greedy, temperature, top-k, top-p, seeds.

Each row's random draw is a pure function of (its seed, the position it samples at, the token id),
a counter-based hash rather than a stateful generator. So it runs inside the compiled step, a row
gives the same tokens whatever batch it shares, and a seeded request is reproducible in the static
engine and the server alike. The draw is an exponential race (argmax of p / E, E ~ Exp(1)), which
picks token v with probability p_v, as in gpt-fast.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import Tensor

from ..errors import OverfillError

Kind = Literal["greedy", "temperature", "filtered"]
"""What a batch's rows need, cheapest first: argmax only; softmax and a draw; also a sort for top-k/top-p."""
SAMPLING_KINDS: dict[Kind, dict] = {"greedy": {}, "temperature": {"temperature": 1.0},
                                    "filtered": {"temperature": 1.0, "top_k": 50, "top_p": 0.9}}
"""Each kind, cheapest first, as the SamplingParams fields of a request of that kind."""

_MASK32 = 0xFFFFFFFF


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
        if not 0 <= self.top_k < 2**63:  # it becomes an int64 tensor
            raise OverfillError(f"top_k must be in [0, 2**63), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise OverfillError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise OverfillError(f"seed must be in [0, 2**63), got {self.seed}")
        if any(not s for s in self.stop):
            raise OverfillError("stop strings must be non-empty")
        return self

    @property
    def kind(self) -> Kind:
        if self.temperature == 0:
            return "greedy"
        return "filtered" if self.top_k or self.top_p < 1 else "temperature"


def row_seed(params: SamplingParams) -> int:
    """The seed a row samples with: its own, or a fresh random one."""
    return params.seed if params.seed is not None else secrets.randbits(63)


class Sampler:
    """Per-row sampling settings as device tensors `[B]`, made once per batch (or admission)."""

    def __init__(self, params: Sequence[SamplingParams], seeds: Sequence[int], device: torch.device):
        kinds = [p.kind for p in params]
        self.kind: Kind = max(kinds, key=list(SAMPLING_KINDS).index)
        # A greedy row in a sampled batch takes the argmax (`greedy`); its temperature only has to be finite.
        self.temperature = torch.tensor([p.temperature or 1.0 for p in params], device=device)  # [B]
        self.top_k = torch.tensor([p.top_k for p in params], device=device)  # [B]
        self.top_p = torch.tensor([p.top_p for p in params], device=device)  # [B]
        self.seed = torch.tensor([_fold(s) for s in seeds], dtype=torch.long, device=device)  # [B]
        self.greedy = torch.tensor([k == "greedy" for k in kinds], device=device)  # [B]

    def rows(self, n: int) -> "Sampler":
        """The settings of rows 0..n-1, padded with greedy rows up to n if there are fewer."""
        view = Sampler.__new__(Sampler)
        view.kind = self.kind
        for name in ("temperature", "top_k", "top_p", "seed", "greedy"):
            t = getattr(self, name)
            if len(t) < n:
                pad = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0, "greedy": True}[name]
                t = torch.cat([t, torch.full((n - len(t),), pad, dtype=t.dtype, device=t.device)])
            setattr(view, name, t[:n])
        return view


def _fold(seed: int) -> int:
    """A 63-bit seed folded into 32 bits (the hash works on 32-bit words)."""
    return (seed ^ (seed >> 32)) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform(seed: Tensor, counter: Tensor, vocab: int) -> Tensor:
    """Uniform draws in (0, 1) `[B, V]` from per-row seeds and counters `[B]`."""
    token = torch.arange(vocab, device=seed.device)  # [V]
    key = _hash32((_hash32(seed) + counter) & _MASK32)  # [B]
    bits = _hash32((key[:, None] + token * 0x9E3779B9) & _MASK32)  # [B, V]
    return ((bits >> 8).float() + 0.5) / (1 << 24)


def _filter(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Logits `[B, V]` with what each row's top-k and top-p leave out set to -inf."""
    V = logits.shape[-1]
    ordered = logits.sort(dim=-1, descending=True).values  # [B, V]
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)  # [B]
    kth = ordered.gather(-1, (k - 1)[:, None])  # [B, 1]
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = ordered.softmax(-1)
    before = probs.cumsum(-1) - probs  # [B, V]: the mass of the tokens ranked above
    keep = before < top_p[:, None]  # the first token that reaches top_p is kept too
    cutoff = ordered.masked_fill(~keep, float("inf")).amin(-1, keepdim=True)  # [B, 1]
    return logits.masked_fill(logits < torch.maximum(kth, cutoff), float("-inf"))


def sample(logits: Tensor, sampler: Sampler | None, counter: Tensor) -> Tensor:
    """Next token `[B]` from logits `[B, V]`; `counter` `[B]` (the position sampled at) keys the draw."""
    if sampler is None or sampler.kind == "greedy":
        return logits.argmax(-1)
    logits = logits.float() / sampler.temperature[:, None]
    if sampler.kind == "filtered":
        logits = _filter(logits, sampler.top_k, sampler.top_p)
    race = logits.softmax(-1) / -uniform(sampler.seed, counter, logits.shape[-1]).log()  # [B, V]
    return torch.where(sampler.greedy, logits.argmax(-1), race.argmax(-1))
