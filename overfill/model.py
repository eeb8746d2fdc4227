"""A compact Llama / Mistral / Qwen2 / Qwen3 decoder-only transformer.

Parameter names are those of the Hugging Face checkpoints, so a HF state dict loads
as-is and `transformers` stays the numerical reference in the tests. Unlike the HF
classes, the forward pass takes explicit rotary positions, an explicit attention
mask and an explicit `KVCache`, which is what prefill / hand-off / decode need.
`head_dim` is read from the config, never derived from the width: a pruned decoder
keeps the full model's head size with fewer channels.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import OverfillError
from .files import atomic_file, json_loads
from .kv_cache import KVCache

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096

    @classmethod
    def from_hf(cls, config) -> "ModelArgs":
        """From a transformers config object or its `config.json` dict."""
        c = config if isinstance(config, dict) else config.to_dict()
        model_type = c.get("model_type")
        if model_type not in SUPPORTED_TYPES:
            raise OverfillError(f"unsupported architecture '{model_type}': supported are {', '.join(SUPPORTED_TYPES)}")
        if c.get("mlp_bias"):
            raise OverfillError("unsupported config: mlp_bias=true")
        if model_type in ("qwen2", "qwen3") and c.get("use_sliding_window"):
            raise OverfillError("unsupported config: use_sliding_window=true")
        _check_config_values(c)
        heads = c["num_attention_heads"]
        attention_bias = bool(c.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_parameters=_rope_parameters(c),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type in ("llama", "mistral") and attention_bias,
            qk_norm=model_type == "qwen3",
            max_position_embeddings=c.get("max_position_embeddings", 4096),
        )

    def num_params(self) -> int:
        d, h, kv, hd, f = (self.hidden_size, self.num_attention_heads, self.num_key_value_heads,
                           self.head_dim, self.intermediate_size)
        attn = d * hd * (2 * h + 2 * kv) + self.qkv_bias * hd * (h + 2 * kv) + self.o_bias * d
        attn += 2 * hd * self.qk_norm
        block = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * block + embed + d


REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def _check_config_values(c: dict) -> None:
    """Missing, mistyped or nonsensical sizes get a clear error here, not a crash (or garbage) later."""
    for key in REQUIRED_INTS + OPTIONAL_INTS:
        if key not in c or (c[key] is None and key in OPTIONAL_INTS):
            if key in REQUIRED_INTS:
                raise OverfillError(f"config.json lacks '{key}'")
            continue
        value = c[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise OverfillError(f"config.json: '{key}' must be an integer, got {value!r}")
        if value < 1:
            raise OverfillError(f"config.json: '{key}' must be positive, got {value}")
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    if heads % kv:
        raise OverfillError(f"config.json: num_attention_heads ({heads}) must be a multiple of "
                            f"num_key_value_heads ({kv})")
    eps = c.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise OverfillError(f"config.json: 'rms_norm_eps' must be a positive number, got {eps!r}")


def _rope_parameters(c: dict) -> dict:
    params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    params.setdefault("rope_theta", c.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Rotary inverse frequencies `[D/2]` for the rope types of the supported models."""
    p, d = args.rope_parameters, args.head_dim
    inv_freq = 1.0 / (p["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    kind = p["rope_type"]
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / p["factor"]
    if kind == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise OverfillError(f"unsupported rope_type '{kind}' (supported: default, linear, llama3)")


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x [B, T, H, D]; cos, sin [B, T, D], in x's dtype as in transformers (under autocast x is bf16)
    cos, sin = cos.to(x.dtype)[:, :, None], sin.to(x.dtype)[:, :, None]
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


_ONE_ROW_KERNEL: tuple | None = None  # (kernel, max rows): the engine's bf16 CPU product, once it enables it


def use_one_row_kernel(kernel=None, max_rows: int = 0) -> None:
    """Send products of at most `max_rows` rows (bf16, CPU, no autograd, no bias) to `kernel(x, weight)`;
    no kernel: `F.linear` everywhere. The engine sets it (engine/one_row.py says why)."""
    global _ONE_ROW_KERNEL
    _ONE_ROW_KERNEL = None if kernel is None else (kernel, max_rows)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear`, or the one-row kernel for a decode step's few rows: x [..., K], weight [N, K] -> [..., N]."""
    if (_ONE_ROW_KERNEL is not None and bias is None and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and x.device.type == "cpu" and x.numel() <= _ONE_ROW_KERNEL[1] * x.shape[-1]
            and not torch.is_grad_enabled()):
        return _ONE_ROW_KERNEL[0](x, weight)
    return F.linear(x, weight, bias)


_DECODE_LAYERS = None  # the engine's whole-layer-stack decode step (engine/one_row.py), once it enables it


def use_decode_layers(stack=None) -> None:
    """Run the layers of a decode step (one token per row, a cache, no autograd) as `stack(model, x, rope,
    kv_cache, slots, mask)` where `stack.supports(model, rows)`; None: layer by layer. The engine sets it."""
    global _DECODE_LAYERS
    _DECODE_LAYERS = stack


def decodes_with_layer_stack(model: "Transformer", rows: int) -> bool:
    """Whether a decode step of `rows` rows of `model` would run through the layer stack (eagerly)."""
    return (_DECODE_LAYERS is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and _DECODE_LAYERS.supports(model, rows))


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and names) whose product goes through `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class Fusable(nn.Module):
    """A module whose input projections can run as one product at inference (gpt-fast's fused QKV).

    `fuse()` concatenates the weights (and biases) of `PROJECTIONS` into one non-persistent
    buffer and makes each projection's parameter data a view of it: the HF names, the
    parameter objects, the state dict and in-place updates stay as they are, and a decode
    step reads the rows in one kernel. The fused product runs only without autograd (the
    buffer has no gradient); moving the module (`.to()`) rebuilds it from the moved parameters.
    """
    PROJECTIONS: tuple[str, ...] = ()

    def fuse(self) -> None:
        projections = [getattr(self, name) for name in self.PROJECTIONS]
        self.fused_sizes = [p.out_features for p in projections]
        for kind in ("weight", "bias"):
            parts = [getattr(p, kind) for p in projections]
            fused = None if parts[0] is None else torch.cat([t.detach() for t in parts])  # [sum of outs, ...]
            self.register_buffer(f"fused_{kind}", fused, persistent=False)
            if fused is not None:
                for part, view in zip(parts, fused.split(self.fused_sizes)):
                    part.data = view

    @property
    def is_fused(self) -> bool:
        return getattr(self, "fused_weight", None) is not None

    def projections(self, x: Tensor) -> tuple[Tensor, ...]:
        """Each of `PROJECTIONS` applied to x: one fused product where possible."""
        if self.is_fused and not torch.is_grad_enabled():
            return linear(x, self.fused_weight, self.fused_bias).split(self.fused_sizes, dim=-1)
        return tuple(getattr(self, name)(x) for name in self.PROJECTIONS)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.is_fused:  # the parameters were converted one by one and share nothing now
            self.fuse()
        return self


class Attention(Fusable):
    PROJECTIONS = ("q_proj", "k_proj", "v_proj")

    def __init__(self, args: ModelArgs):
        super().__init__()
        d, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, hd
        self.q_proj = Linear(d, self.n_heads * hd, bias=args.qkv_bias)
        self.k_proj = Linear(d, self.n_kv_heads * hd, bias=args.qkv_bias)
        self.v_proj = Linear(d, self.n_kv_heads * hd, bias=args.qkv_bias)
        self.o_proj = Linear(self.n_heads * hd, d, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(hd, args.rms_norm_eps)
            self.k_norm = RMSNorm(hd, args.rms_norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, kv_cache: KVCache | None,
                layer: int, slots: Tensor | None, kv_len: int | None, shared_kv: tuple | None,
                prefix_kv: KVCache | None = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.projections(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if shared_kv is not None:
            # Training: at prompt positions, attend to the full model's keys and values.
            source, use_source = shared_kv  # KVCache with S == T; [B, 1, T, 1] bool
            k = torch.where(use_source, source.k[layer], k)
            v = torch.where(use_source, source.v[layer], v)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, slots, k, v, kv_len)  # [B, H_kv, S, D]
        if prefix_kv is not None:
            # Training: keys and values of earlier slots (the full model's prompt), read-only, then ours.
            k = torch.cat((prefix_kv.k[layer].to(k.dtype), k), dim=2)  # [B, H_kv, P + T, D]
            v = torch.cat((prefix_kv.v[layer].to(v.dtype), v), dim=2)
        y = attention(q, k, v, mask)  # [B, H, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Masked attention: q `[B, H, T, D]`, k/v `[B, H_kv, S, D]`, mask `[B, 1, T, S]` bool -> `[B, H, T, D]`.

    SDPA, except when training in bf16 on a CPU: there the plain formulation (bf16 batched
    products, softmax with fp32 accumulation) runs forward + backward about 1.7x faster than the
    CPU flash kernel with a mask (benchmarks/train/README.md). It keeps `[B * H, T, S]` scores
    for the backward pass, which training batches afford.
    """
    n_rep = q.shape[1] // k.shape[1]
    if not (q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_rep > 1)
    with torch.autocast("cpu", enabled=False):
        B, H, T, D = q.shape
        k, v = k.to(q.dtype).repeat_interleave(n_rep, 1), v.to(q.dtype).repeat_interleave(n_rep, 1)  # [B, H, S, D]
        S = k.shape[2]
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        scores = torch.baddbmm(bias.expand(B, H, T, S).reshape(B * H, T, S), (q * D ** -0.5).reshape(B * H, T, D),
                               k.reshape(B * H, S, D).transpose(1, 2))  # [B * H, T, S]
        return torch.bmm(scores.softmax(-1), v.reshape(B * H, S, D)).view(B, H, T, D)


class MLP(Fusable):
    PROJECTIONS = ("gate_proj", "up_proj")

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.projections(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: Tensor, rope, mask, kv_cache, layer, slots, kv_len, shared_kv, prefix_kv=None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, kv_cache, layer, slots, kv_len, shared_kv,
                               prefix_kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.gradient_checkpointing = False
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        dtype = self.model.embed_tokens.weight.dtype
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, tokens: Tensor, positions: Tensor, mask: Tensor, kv_cache: KVCache | None = None,
                slots: Tensor | None = None, kv_len: int | None = None, shared_kv: tuple | None = None,
                last_only: bool = False, prefix_kv: KVCache | None = None, select: Tensor | None = None) -> Tensor:
        """Logits `[B, T, V]` (`[B, 1, V]` with last_only) for tokens `[B, T]`; see `hidden`.

        select `[B, T]` bool: logits `[N, V]` at the N selected positions only (where a loss is taken).
        """
        x = self.hidden(tokens, positions, mask, kv_cache, slots, kv_len, shared_kv, last_only, prefix_kv)
        if select is None and x.shape[1] == 1 and decodes_with_layer_stack(self, x.shape[0]):
            return _DECODE_LAYERS.logits(self, x)  # a decode step's or a prefill's next-token logits, fp32
        return self.lm_head(x if select is None else x[select])

    def hidden(self, tokens: Tensor, positions: Tensor, mask: Tensor, kv_cache: KVCache | None = None,
               slots: Tensor | None = None, kv_len: int | None = None, shared_kv: tuple | None = None,
               last_only: bool = False, prefix_kv: KVCache | None = None) -> Tensor:
        """Final-norm hidden states `[B, T, D]` for tokens `[B, T]`.

        positions `[B, T]`: rotary positions. mask `[B, 1, T, S]` bool: which keys each query
        sees (S = T without a cache, else the cache slots `[:kv_len]`). kv_cache/slots: write
        this step's K/V into those slots `[T]` and attend over the cache. shared_kv: see Attention.
        prefix_kv: a cache of P slots whose keys and values come before these T tokens (S = P + T),
        read without being written: the decoder's training pass over a response reads the full
        model's prompt cache this way.
        """
        x = self.model.embed_tokens(tokens)  # [B, T, D]
        rope = self.rope(positions)
        if self._steps_with_layer_stack(tokens, kv_cache, shared_kv, prefix_kv):
            return self.model.norm(_DECODE_LAYERS(self, x, rope, kv_cache, slots, mask))
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, rope, mask, kv_cache, i, slots, kv_len, shared_kv, prefix_kv, use_reentrant=False)
            else:
                x = layer(x, rope, mask, kv_cache, i, slots, kv_len, shared_kv, prefix_kv)
        if last_only:
            x = x[:, -1:]
        return self.model.norm(x)

    def _steps_with_layer_stack(self, tokens: Tensor, kv_cache: KVCache | None, shared_kv, prefix_kv) -> bool:
        """Whether this pass is a decode step (one token per row, a cache) that the layer stack runs."""
        return (tokens.shape[1] == 1 and kv_cache is not None and shared_kv is None and prefix_kv is None
                and decodes_with_layer_stack(self, tokens.shape[0]))

    def fuse_projections(self) -> "Transformer":
        """For inference: q/k/v and gate/up each as one product (see `Fusable`); idempotent."""
        for module in self.modules():
            if isinstance(module, Fusable) and not module.is_fused:
                module.fuse()
        return self

    def num_bytes(self) -> int:
        """Bytes of the distinct weights (tied embeddings counted once)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        w = self.model.embed_tokens.weight
        a = self.args
        return KVCache(a.num_hidden_layers, batch, a.num_key_value_heads, max_len, a.head_dim, w.dtype, w.device)


def positions_from_padding(attention_mask: Tensor) -> Tensor:
    """Rotary positions `[B, T]` from a padding mask `[B, T]`: the count of real tokens before.

    Taken from the mask, never from the cache length, so left-padded rows get the same
    positions as when they run alone.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_mask(key_valid: Tensor, query_slots: Tensor) -> Tensor:
    """Attention mask `[B, 1, T, S]` for queries in `query_slots` `[T]` over keys `[B, S]`.

    A query sees valid keys at or before its own slot. It always sees itself, so a
    padding query never has an empty row (which would give NaN).
    """
    key_slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    causal = key_slots[None, :] <= query_slots[:, None]  # [T, S]
    own = key_slots[None, :] == query_slots[:, None]  # [T, S]
    return ((causal[None] & key_valid[:, None, :]) | own[None])[:, None]


# ---------------------------------------------------------------------------- loading / saving

def read_config(path: str | os.PathLike) -> dict:
    from .files import read_json_object

    return read_json_object(Path(path) / "config.json")


WEIGHTS_INDEX = "model.safetensors.index.json"


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model directory: those its index names, else model.safetensors.

    Each must lie inside the directory: a name or a link that leads out of it is refused, so that
    a model directory cannot make the loader read (or load) files elsewhere.
    """
    path = Path(path)
    index = path / WEIGHTS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json_loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise OverfillError(f"cannot read {index}: {e!r}") from None
        if not all(isinstance(name, str) for name in names):
            raise OverfillError(f"cannot read {index}: its weight_map must name files")
    elif (path / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        raise OverfillError(f"no safetensors weights in '{path}' (expected model.safetensors)")
    return [_inside(path, name) for name in names]


def _inside(model_dir: Path, name: str) -> Path:
    """model_dir / name, where that file lies in `model_dir` (after links)."""
    file = model_dir / name
    homes = [model_dir.resolve()]
    if model_dir.parent.name == "snapshots":  # the hub cache links a snapshot's files to the blobs beside it
        homes.append((model_dir.parent.parent / "blobs").resolve())
    real = file.resolve()
    if Path(name).is_absolute() or ".." in Path(name).parts or not any(home in real.parents for home in homes):
        raise OverfillError(f"the weights file '{name}' of '{model_dir}' lies outside it (as {real}): refused, a "
                            f"model directory must hold its own weights")
    return file


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for file in weight_files(path):
        try:
            state.update(load_file(str(file)))
        except (OSError, SafetensorError) as e:
            raise OverfillError(f"cannot read the weights {file} (cut off or not safetensors?): {e}") from None
    return state


def weights_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of a model directory's safetensors files: which exact weights were evaluated, or which
    full model an OverFill decoder was trained with."""
    digest = hashlib.sha256()
    for file in sorted(weight_files(path)):
        with file.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def load_model(ref: str | os.PathLike, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> Transformer:
    """Our Transformer from a model reference (built-in name, HF dir or hub id)."""
    from .hub import resolve

    path = resolve(ref)
    args = ModelArgs.from_hf(read_config(path))
    state = load_state_dict(path)
    return from_state_dict(args, state, dtype=dtype, device=device, source=str(path))


def from_state_dict(args: ModelArgs, state: dict[str, Tensor], dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, source: str = "state dict") -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    try:
        unexpected = model.load_state_dict(state, strict=False, assign=True).unexpected_keys
    except RuntimeError as e:
        raise OverfillError(f"weights in {source} do not match its config: {str(e).splitlines()[0]}") from None
    if unexpected:
        raise OverfillError(f"weights in {source} hold {len(unexpected)} tensors its config does not describe, "
                            f"e.g. {unexpected[0]}: does config.json (num_hidden_layers, ...) belong to these weights?")
    model.tie_weights()  # assign=True replaced the embedding Parameter
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise OverfillError(f"weights in {source} lack {len(missing)} tensors, e.g. {missing[0]}")
    model.inv_freq = rope_inv_freq(args)
    return model.to(device=device, dtype=dtype or next(iter(state.values())).dtype).eval()


def _own_storage(t: Tensor) -> Tensor:
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()


def save_model(model: Transformer, out: str | os.PathLike, config_from: str | os.PathLike) -> None:
    """Write a HF-loadable directory: weights from `model`, config (and tokenizer) from `config_from`."""
    import shutil

    from safetensors.torch import save_file

    out, src = Path(out), Path(config_from)
    out.mkdir(parents=True, exist_ok=True)
    # Fused projections are views of one buffer; safetensors wants tensors with storages of their own.
    state = {k: _own_storage(v.detach().contiguous().cpu()) for k, v in model.state_dict().items()}
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with atomic_file(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    if src.resolve() != out.resolve():
        for name in os.listdir(src):
            if name.endswith((".json", ".jinja", ".model", ".txt")) and not name.startswith("model.safetensors"):
                shutil.copy2(src / name, out / name)
