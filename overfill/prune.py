"""Minitron-style structured pruning that keeps the KV cache compatible (arXiv 2407.14679).

The decoder of an OverFill pair is a dense copy of the full model with fewer hidden channels,
MLP neurons and (optionally) query heads or layers. It must read the full model's KV cache as
it is, so every KV head and the head size are kept, query heads are removed evenly inside each
GQA group, and a depth-pruned decoder records which full-model layer's KV each of its layers
reads (`layer_map`).

Importance comes from activations on calibration text, in one pass over the full model:
- hidden channel: the outputs of every normalisation layer (both per block, and the final one);
- MLP neuron: the input of the down projection, per layer;
- query head: the L2 norm of the head's attention output (the input of o_proj), per layer;
- layer: 1 - cosine(block input, block output), averaged over tokens.
Per-token scores are reduced over each sequence (`seq_aggregate`) and then over the batch
(`batch_aggregate`); Minitron found mean-then-L2 best, which is the default.

    overfill prune smollm2-135m-instruct --out pruned --hidden 0.45 --intermediate 0.45

writes a plain Hugging Face model directory (weights, config, tokenizer) plus
`prune_record.json` (kept indices, importance summaries, sizes, calibration loss before and
after) and `prune_config.json` (the settings used).
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .errors import OverfillError
from .device import AUTO_PRECISION_HELP, pick_device, resolve_precision
from .model import ModelArgs

RECORD_FILE = "prune_record.json"
CONFIG_FILE = "prune_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")

Aggregate = Literal["mean", "l2", "max"]


@dataclass
class PruneConfig:
    """What to remove and how to measure importance. Saved beside the pruned model."""

    hidden: float = field(default=0.0, metadata={
        "help": "hidden channels: fraction to remove (0..1) or the number to keep (a whole number >= 1)"})
    intermediate: float = field(default=0.0, metadata={
        "help": "MLP neurons per layer: fraction to remove (0..1) or the number to keep"})
    heads: float = field(default=0.0, metadata={
        "help": "query heads per layer: fraction to remove (0..1) or the number to keep; "
                "removed evenly in each KV group"})
    depth: float = field(default=0.0, metadata={
        "help": "layers: fraction to remove (0..1) or the number to keep"})
    depth_method: Literal["cosine", "first", "last", "firstlast"] = field(default="cosine", metadata={
        "help": "which layers stay: cosine = the least input-preserving blocks (Minitron/ShortGPT); "
                "first/last = the first/last N; firstlast = layer 0 and the last N-1"})
    multiple: int = field(default=64, metadata={
        "help": "round hidden and MLP widths to a multiple of this (fast matrix products)"})
    calibration: str = field(default="sharegpt", metadata={
        "help": "calibration data: a built-in dataset name or a local .txt/.jsonl file"})
    samples: int = field(default=128, metadata={"help": "number of calibration sequences"})
    loss_samples: int = field(default=32, metadata={
        "help": "of these, how many the calibration loss before and after pruning is measured on"})
    seq_len: int = field(default=512, metadata={"help": "tokens per calibration sequence (longer texts are cut)"})
    batch_size: int = field(default=16, metadata={"help": "calibration sequences per forward pass"})
    seq_aggregate: Aggregate = field(default="mean", metadata={
        "help": "how activations are reduced over the tokens of a sequence"})
    batch_aggregate: Aggregate = field(default="l2", metadata={
        "help": "how per-sequence scores are reduced over the calibration set"})
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={
        "help": "precision of the calibration passes, on a copy of the model if its weights differ (the saved "
                "weights keep their own precision); " + AUTO_PRECISION_HELP})
    device: str = field(default="auto", metadata={"help": "device for calibration: auto, cpu, cuda, cuda:1, ..."})
    seed: int = field(default=0, metadata={"help": "seed for picking calibration texts"})


@dataclass(kw_only=True)
class PruneArgs(PruneConfig):
    """`overfill prune`: the PruneConfig plus where the model comes from and goes to."""

    model: str = field(metadata={"help": "model to prune: built-in name, HF directory or hub id", "positional": True})
    out: str = field(default="pruned", metadata={"help": "output directory (a Hugging Face model directory)"})
    overwrite: bool = field(default=False, metadata={"help": "replace the output directory if it exists"})


@dataclass
class Widths:
    """The shape of a model, as far as pruning is concerned."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int

    @classmethod
    def of(cls, config) -> "Widths":
        heads = config.num_attention_heads
        return cls(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                   num_attention_heads=heads, num_key_value_heads=config.num_key_value_heads or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   num_hidden_layers=config.num_hidden_layers)


@dataclass
class Rounding:
    """How one requested width became the kept width."""

    requested: float
    """The flag value: a fraction to remove or a width to keep."""
    target: float
    """The exact width that asks for."""
    kept: int
    multiple: int
    """The kept width is a multiple of this (0: not pruned)."""
    note: str = ""


@dataclass
class PrunePlan:
    """The pruned model's widths and how each was rounded; decided before any computation."""

    full: Widths
    pruned: Widths
    rounding: dict[str, Rounding]


@dataclass
class Kept:
    """Indices (into the full model) of what stays, sorted ascending."""

    hidden: Tensor
    """[D'] hidden channels."""
    layers: list[int]
    """Full-model layer of each pruned-model layer."""
    neurons: list[Tensor]
    """Per kept layer: [F'] MLP neurons."""
    heads: list[Tensor]
    """Per kept layer: [H'] query heads."""


@dataclass
class Importance:
    """Activation-based importance of every prunable unit of the full model."""

    hidden: Tensor
    """[D], summed over all normalisation layers."""
    neurons: list[Tensor]
    """Per layer: [F]."""
    heads: list[Tensor]
    """Per layer: [H]."""
    blocks: Tensor | None
    """[L]: 1 - cosine(block input, block output); None when not measured."""


@dataclass
class PruneRecord:
    """Everything about one pruning run; written as prune_record.json."""

    source: str
    architecture: str
    config: dict
    full: dict
    pruned: dict
    rounding: dict
    kept: dict
    """hidden: [D'], layers: [L'], intermediate: per kept layer [F'], heads: per kept layer [H']."""
    layer_map: list[int] | None
    """Full-model layer whose KV each decoder layer reads; None when no layer was removed."""
    importance: dict
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    calibration: dict
    seconds: float

    def save(self, out: str | os.PathLike) -> None:
        (Path(out) / RECORD_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PruneRecord":
        file = Path(path) / RECORD_FILE
        try:
            return cls(**json.loads(file.read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise OverfillError(f"cannot read the pruning record {file}: {e}") from None


# ---------------------------------------------------------------------------- planning widths

def plan(config, cfg: PruneConfig) -> PrunePlan:
    """Validate the request against a model config and choose every kept width."""
    ModelArgs.from_hf(config)  # the decoder must be a model OverFill can run: same checks
    _check_settings(cfg)
    full = Widths.of(config)
    heads = _plan_heads(cfg.heads, full)
    hidden = _plan_width("hidden", cfg.hidden, full.hidden_size, cfg.multiple, divisor=heads.kept)
    intermediate = _plan_width("intermediate", cfg.intermediate, full.intermediate_size, cfg.multiple)
    depth = _plan_depth(cfg.depth, full.num_hidden_layers)
    pruned = Widths(hidden_size=hidden.kept, intermediate_size=intermediate.kept, num_attention_heads=heads.kept,
                    num_key_value_heads=full.num_key_value_heads, head_dim=full.head_dim,
                    num_hidden_layers=depth.kept)
    return PrunePlan(full, pruned, {"hidden": hidden, "intermediate": intermediate, "heads": heads, "depth": depth})


def _check_settings(cfg: PruneConfig) -> None:
    for name in ("multiple", "samples", "loss_samples", "batch_size"):
        if getattr(cfg, name) < 1:
            raise OverfillError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.seq_len < 2:
        raise OverfillError(f"--seq-len must be at least 2 tokens, got {cfg.seq_len}")


def _target(name: str, spec: float, full: int) -> float:
    """The width a flag asks for: a fraction to remove (0 <= x < 1) or a whole width to keep."""
    if not math.isfinite(spec) or spec < 0:
        raise OverfillError(f"--{name} {spec}: give a fraction to remove in [0, 1) or a whole width to keep")
    if spec < 1:
        return full * (1 - spec)
    if spec != int(spec):
        raise OverfillError(f"--{name} {spec}: a value >= 1 is a width to keep and must be a whole number "
                            f"(a fraction to remove must be below 1)")
    if spec > full:
        raise OverfillError(f"--{name} {int(spec)} is larger than the model's {full}; "
                            f"give at most {full} or a fraction to remove")
    return spec


def _plan_width(name: str, spec: float, full: int, multiple: int, divisor: int = 1) -> Rounding:
    """Round a width to a multiple of lcm(`multiple`, `divisor`), below the full width.

    `divisor` is a requirement (transformers refuses a hidden size that is not a multiple of
    the attention heads), `multiple` a preference: it is halved only while no width below the
    full one is a multiple of both (SmolLM2: 576 channels, 9 heads, lcm(64, 9) = 576).
    """
    target = _target(name, spec, full)
    if target >= full:
        if full % divisor == 0:
            return Rounding(spec, target, full, 0, "not pruned")
        return Rounding(spec, target, full // divisor * divisor, divisor, f"multiple of {divisor} attention heads")
    m = multiple
    while True:
        step = math.lcm(m, divisor)
        kept = min(max(step, round(target / step) * step), (full - 1) // step * step)
        if kept > 0:
            break
        if m == 1:
            raise OverfillError(f"--{name} {spec}: no width below {full} is a multiple of {divisor} "
                                f"(the number of attention heads)")
        m = max(1, m // 2)
    note = f"multiple of {m}" + (f" and of {divisor} attention heads" if divisor > 1 else "")
    if m != multiple:
        note += f"; no width below {full} is a multiple of {math.lcm(multiple, divisor)}"
    return Rounding(spec, target, kept, step, note)


def _plan_heads(spec: float, full: Widths) -> Rounding:
    """Query heads: a whole number per KV group, so the KV heads and the cache stay as they are."""
    target = _target("heads", spec, full.num_attention_heads)
    groups = full.num_key_value_heads
    kept = max(1, round(target / groups)) * groups
    if kept == full.num_attention_heads:
        return Rounding(spec, target, kept, 0, "not pruned")
    return Rounding(spec, target, kept, groups, f"{kept // groups} per KV head ({groups} KV heads)")


def _plan_depth(spec: float, layers: int) -> Rounding:
    target = _target("depth", spec, layers)
    kept = max(1, round(target))
    if kept == layers:
        return Rounding(spec, target, kept, 0, "not pruned")
    return Rounding(spec, target, kept, 1, f"{kept} of {layers} layers")


# ---------------------------------------------------------------------------- calibration data

@dataclass
class Batch:
    """Right-padded calibration sequences of similar length."""

    tokens: Tensor
    """[B, T] token ids."""
    mask: Tensor
    """[B, T] bool, False on padding."""
    scored: bool
    """Whether the calibration loss (before and after pruning) is measured on it."""


def calibration_batches(tokenizer, texts: list[str], seq_len: int, batch_size: int, scored: int) -> list[Batch]:
    """Token batches of the texts cut to `seq_len` tokens; the first `scored` texts are scored."""
    ids = [row for row in tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"] if row]
    if not ids:
        raise OverfillError("the calibration texts are all empty: give a data source with text in it")
    if max(len(row) for row in ids[:scored]) < 2:
        raise OverfillError("the calibration texts are single tokens: give longer texts")
    return _batches(ids[:scored], batch_size, True) + _batches(ids[scored:], batch_size, False)


def _batches(ids: list[list[int]], batch_size: int, scored: bool) -> list[Batch]:
    ids = sorted(ids, key=len, reverse=True)  # similar lengths together: little padding
    batches = []
    for start in range(0, len(ids), batch_size):
        rows = ids[start:start + batch_size]
        tokens = torch.zeros(len(rows), len(rows[0]), dtype=torch.long)
        mask = torch.zeros(len(rows), len(rows[0]), dtype=torch.bool)
        for b, row in enumerate(rows):
            tokens[b, :len(row)] = torch.tensor(row)
            mask[b, :len(row)] = True
        batches.append(Batch(tokens, mask, scored))
    return batches


def _calibration_texts(cfg: PruneConfig, tokenizer, texts: list[str] | None) -> list[str]:
    if texts is None:
        from .data import calibration_texts

        texts = calibration_texts(cfg.calibration, cfg.samples, seed=cfg.seed, tokenizer=tokenizer)
    texts = [t for t in texts[:cfg.samples] if t.strip()]
    if not texts:
        raise OverfillError(f"calibration data '{cfg.calibration}' has no text: give a source with "
                            f"non-empty texts (--calibration sharegpt or a .txt/.jsonl file)")
    return texts


# ---------------------------------------------------------------------------- importance

def _reduce_tokens(x: Tensor, mask: Tensor, how: str) -> Tensor:
    """[B, T, C] activations -> [B, C] float32, over the real tokens (mask [B, T] bool) only."""
    if how == "mean":  # as a matrix product: an elementwise pass in float32 would cost a third of the forward
        sums = torch.bmm(mask[:, None, :].to(x.dtype), x)[:, 0].float()  # [B, C]
        return sums / mask.sum(1, keepdim=True)
    x = x * mask[..., None].to(x.dtype)  # zero the padding (exact in any dtype)
    if how == "l2":
        return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32)
    return x.abs().amax(1).float()


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """[B, T, D] x 2 -> [B, T] cosine similarity, accumulated in float32."""
    dot = (a * b).sum(-1, dtype=torch.float32)
    norms = torch.linalg.vector_norm(a, dim=-1, dtype=torch.float32) * torch.linalg.vector_norm(b, dim=-1, dtype=torch.float32)
    return dot / norms.clamp_min(1e-12)


class _BatchAggregate:
    """Streams per-sequence scores [B, C] into one score per channel [C]."""

    def __init__(self, how: str):
        self.how, self.total, self.count = how, None, 0

    def add(self, per_sequence: Tensor) -> None:
        v = per_sequence.abs()
        part = v.amax(0) if self.how == "max" else (v.square() if self.how == "l2" else v).sum(0)
        if self.total is None:
            self.total = part
        else:
            self.total = torch.maximum(self.total, part) if self.how == "max" else self.total + part
        self.count += v.shape[0]

    def result(self) -> Tensor:
        if self.how == "l2":
            return self.total.sqrt()
        return self.total / self.count if self.how == "mean" else self.total


class _ImportanceHooks:
    """Forward hooks on the full model that accumulate Minitron importance during calibration.

    Block importance (a cosine per token and layer) is measured only when `blocks` is set:
    only depth pruning by cosine needs it.
    """

    def __init__(self, model, cfg: PruneConfig, blocks: bool):
        self.model, self.cfg, self.blocks = model, cfg, blocks
        self.mask: Tensor | None = None  # [B, T] bool of the batch being run
        layers = model.model.layers
        self.norms = [_BatchAggregate(cfg.batch_aggregate) for _ in range(2 * len(layers) + 1)]
        self.neurons = [_BatchAggregate(cfg.batch_aggregate) for _ in layers]
        self.heads = [_BatchAggregate(cfg.batch_aggregate) for _ in layers]
        self.block_distance = torch.zeros(len(layers), dtype=torch.float64)
        self.tokens = 0
        self.handles = []

    def __enter__(self) -> "_ImportanceHooks":
        norms = [n for layer in self.model.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        norms.append(self.model.model.norm)
        for module, stat in zip(norms, self.norms):
            self.handles.append(module.register_forward_hook(self._channels(stat, output=True)))
        head_dim = Widths.of(self.model.config).head_dim
        for i, layer in enumerate(self.model.model.layers):
            self.handles.append(layer.mlp.down_proj.register_forward_hook(self._channels(self.neurons[i], output=False)))
            self.handles.append(layer.self_attn.o_proj.register_forward_hook(self._heads(self.heads[i], head_dim)))
            if self.blocks:
                self.handles.append(layer.register_forward_hook(self._block(i), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _channels(self, stat: _BatchAggregate, output: bool):
        def hook(module, inputs, out):
            x = out if output else inputs[0]  # [B, T, C]
            stat.add(_reduce_tokens(x, self.mask, self.cfg.seq_aggregate))
        return hook

    def _heads(self, stat: _BatchAggregate, head_dim: int):
        def hook(module, inputs, out):
            x = inputs[0]  # [B, T, H * head_dim]
            per_head = torch.linalg.vector_norm(x.unflatten(-1, (-1, head_dim)), dim=-1, dtype=torch.float32)  # [B, T, H]
            stat.add(_reduce_tokens(per_head, self.mask, self.cfg.seq_aggregate))
        return hook

    def _block(self, i: int):
        def hook(module, args, kwargs, out):
            x_in = args[0] if args else kwargs["hidden_states"]  # [B, T, D]
            x_out = out[0] if isinstance(out, tuple) else out
            self.block_distance[i] += (1 - _cosine(x_in, x_out))[self.mask].sum().item()
            if i == 0:
                self.tokens += int(self.mask.sum().item())
        return hook

    def result(self) -> Importance:
        return Importance(hidden=torch.stack([s.result() for s in self.norms]).sum(0),
                          neurons=[s.result() for s in self.neurons],
                          heads=[s.result() for s in self.heads],
                          blocks=(self.block_distance / self.tokens).float() if self.blocks else None)


def calibration_pass(model, batches: list[Batch], desc: str, hooks: _ImportanceHooks | None = None) -> float:
    """Run the batches (and the hooks, if any); the mean next-token loss over the scored ones."""
    device = model.model.embed_tokens.weight.device
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, unit="batch"):
            tokens, mask = batch.tokens.to(device), batch.mask.to(device)
            if hooks is not None:
                hooks.mask = mask
            hidden = model.model(input_ids=tokens, attention_mask=mask, use_cache=False).last_hidden_state  # [B, T, D]
            if not batch.scored:
                continue
            for b in range(tokens.shape[0]):  # one row at a time: [T, vocab] logits, not [B, T, vocab]
                real = mask[b, 1:]
                logits = model.lm_head(hidden[b, :-1][real]).float()  # [N, V]
                nll += nn.functional.cross_entropy(logits, tokens[b, 1:][real], reduction="sum").item()
                count += int(real.sum())
    return nll / count


# ---------------------------------------------------------------------------- choosing what stays

def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores, in ascending index order."""
    return scores.topk(k).indices.sort().values.cpu()


def _top_heads(scores: Tensor, groups: int, per_group: int) -> Tensor:
    """The best `per_group` query heads of each KV group, so every group keeps the same number."""
    grouped = scores.view(groups, -1)  # [KV, H / KV]; heads of group g are g * H/KV ... (g + 1) * H/KV - 1
    local = grouped.topk(per_group, dim=1).indices.sort(dim=1).values  # [KV, per_group]
    return (local + torch.arange(groups, device=scores.device)[:, None] * grouped.shape[1]).flatten().cpu()


def _kept_layers(blocks: Tensor | None, keep: int, total: int, method: str) -> list[int]:
    if keep == total:
        return list(range(total))
    if method == "cosine":
        return sorted(blocks.topk(keep).indices.tolist())
    if method == "first":
        return list(range(keep))
    if method == "last":
        return list(range(total - keep, total))
    return [0] + list(range(total - keep + 1, total))  # firstlast


def choose(importance: Importance, pruning: PrunePlan, depth_method: str) -> Kept:
    layers = _kept_layers(importance.blocks, pruning.pruned.num_hidden_layers, pruning.full.num_hidden_layers,
                          depth_method)
    per_group = pruning.pruned.num_attention_heads // pruning.full.num_key_value_heads
    return Kept(hidden=_top(importance.hidden, pruning.pruned.hidden_size), layers=layers,
                neurons=[_top(importance.neurons[i], pruning.pruned.intermediate_size) for i in layers],
                heads=[_top_heads(importance.heads[i], pruning.full.num_key_value_heads, per_group) for i in layers])


# ---------------------------------------------------------------------------- structured removal

def _take(param: nn.Parameter, index: Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(param.data.index_select(dim, index.to(param.device)).contiguous(),
                        requires_grad=param.requires_grad)


def _slice_linear(linear: nn.Linear, out_index: Tensor | None = None, in_index: Tensor | None = None) -> None:
    if out_index is not None:
        linear.weight = _take(linear.weight, out_index, 0)  # weight: [out, in]
        if linear.bias is not None:
            linear.bias = _take(linear.bias, out_index, 0)
        linear.out_features = len(out_index)
    if in_index is not None:
        linear.weight = _take(linear.weight, in_index, 1)
        linear.in_features = len(in_index)


def _head_rows(heads: Tensor, head_dim: int) -> Tensor:
    """Rows of q_proj (columns of o_proj) that belong to the given heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def apply(model, kept: Kept, pruned: Widths) -> None:
    """Cut the model in place down to the kept units and update its config."""
    body = model.model
    tied = model.lm_head.weight is body.embed_tokens.weight
    body.layers = nn.ModuleList([body.layers[i] for i in kept.layers])
    h = kept.hidden
    body.embed_tokens.weight = _take(body.embed_tokens.weight, h, 1)  # [V, D]
    body.embed_tokens.embedding_dim = len(h)
    body.norm.weight = _take(body.norm.weight, h, 0)
    for new_index, (layer, neurons, heads) in enumerate(zip(body.layers, kept.neurons, kept.heads)):
        attn, mlp = layer.self_attn, layer.mlp
        rows = _head_rows(heads, pruned.head_dim)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight = _take(norm.weight, h, 0)
        _slice_linear(attn.q_proj, out_index=rows, in_index=h)
        _slice_linear(attn.k_proj, in_index=h)
        _slice_linear(attn.v_proj, in_index=h)
        _slice_linear(attn.o_proj, out_index=h, in_index=rows)
        _slice_linear(mlp.gate_proj, out_index=neurons, in_index=h)
        _slice_linear(mlp.up_proj, out_index=neurons, in_index=h)
        _slice_linear(mlp.down_proj, out_index=h, in_index=neurons)
        attn.layer_idx = new_index
        attn.num_key_value_groups = pruned.num_attention_heads // pruned.num_key_value_heads
        layer.hidden_size = pruned.hidden_size
    if tied:
        model.lm_head.weight = body.embed_tokens.weight
    else:
        _slice_linear(model.lm_head, in_index=h)
    _update_config(model.config, pruned, kept.layers)


def _update_config(config, pruned: Widths, layers: list[int]) -> None:
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in layers]
    config.num_attention_heads = pruned.num_attention_heads
    config.head_dim = pruned.head_dim  # explicit: hidden_size // heads is no longer the head size
    config.hidden_size = pruned.hidden_size
    config.intermediate_size = pruned.intermediate_size
    config.num_hidden_layers = pruned.num_hidden_layers
    config.validate_architecture()


# ---------------------------------------------------------------------------- the whole run

def _size(model) -> tuple[int, int]:
    params = list(model.parameters())  # shared (tied) parameters appear once
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _share(scores: Tensor, kept: Tensor) -> float:
    """Fraction of the total importance that the kept units carry."""
    total = scores.sum().item()
    return round(scores[kept.to(scores.device)].sum().item() / total, 6) if total > 0 else 1.0


def _summary(importance: Importance, kept: Kept) -> dict:
    return {
        "hidden_kept_share": _share(importance.hidden, kept.hidden),
        "intermediate_kept_share": [_share(importance.neurons[i], n) for i, n in zip(kept.layers, kept.neurons)],
        "heads_kept_share": [_share(importance.heads[i], h) for i, h in zip(kept.layers, kept.heads)],
        "head_importance": [[round(v, 6) for v in s.tolist()] for s in importance.heads],
        "block_importance": None if importance.blocks is None else [round(v, 6) for v in importance.blocks.tolist()],
    }


def _working_copy(model, dtype: torch.dtype, device: torch.device):
    """The model in the calibration dtype on the calibration device.

    A copy when the dtype differs (bf16 matrix products are twice as fast on CPU too), so the
    pruned weights keep the source's precision and a GPU only ever holds the copy.
    """
    if next(model.parameters()).dtype == dtype:
        return model.to(device)
    return copy.deepcopy(model).to(device=device, dtype=dtype)


def prune_model(model, tokenizer, cfg: PruneConfig, texts: list[str] | None = None,
                source: str = "<in memory>") -> PruneRecord:
    """Prune a loaded transformers causal LM in place and describe what was done.

    Calibration text comes from `cfg.calibration` unless `texts` are given.
    """
    start = time.perf_counter()
    pruning = plan(model.config, cfg)
    batches = calibration_batches(tokenizer, _calibration_texts(cfg, tokenizer, texts), cfg.seq_len,
                                  cfg.batch_size, scored=cfg.loss_samples)
    params_before, bytes_before = _size(model)
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    print(f"calibration in {precision.name} ({precision.reason})", flush=True)
    work = _working_copy(model.eval(), precision.dtype, device)
    depth_pruned = pruning.pruned.num_hidden_layers < pruning.full.num_hidden_layers
    with _ImportanceHooks(work, cfg, blocks=depth_pruned and cfg.depth_method == "cosine") as hooks:
        loss_before = calibration_pass(work, batches, "importance", hooks)
    importance = hooks.result()
    kept = choose(importance, pruning, cfg.depth_method)
    apply(model, kept, pruning.pruned)
    if work is not model:
        apply(work, kept, pruning.pruned)
    loss_after = calibration_pass(work, [b for b in batches if b.scored], "pruned loss")
    params_after, bytes_after = _size(model)
    return PruneRecord(
        source=source, architecture=model.config.model_type, config={**asdict(cfg), **precision.as_dict()},
        full=asdict(pruning.full), pruned=asdict(pruning.pruned),
        rounding={name: asdict(r) for name, r in pruning.rounding.items()},
        kept={"hidden": kept.hidden.tolist(), "layers": kept.layers,
              "intermediate": [n.tolist() for n in kept.neurons], "heads": [h.tolist() for h in kept.heads]},
        layer_map=kept.layers if depth_pruned else None,
        importance=_summary(importance, kept),
        params_before=params_before, params_after=params_after, bytes_before=bytes_before, bytes_after=bytes_after,
        calibration=_calibration_summary(cfg.calibration if texts is None else "<texts given>", batches,
                                         loss_before, loss_after),
        seconds=round(time.perf_counter() - start, 1),
    )


def _calibration_summary(source: str, batches: list[Batch], loss_before: float, loss_after: float) -> dict:
    scored = [b for b in batches if b.scored]
    return {"source": source,
            "sequences": sum(len(b.tokens) for b in batches), "tokens": sum(int(b.mask.sum()) for b in batches),
            "loss_sequences": sum(len(b.tokens) for b in scored), "loss_tokens": sum(int(b.mask.sum()) for b in scored),
            "loss_before": loss_before, "loss_after": loss_after,
            "perplexity_before": math.exp(loss_before), "perplexity_after": math.exp(loss_after)}


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OverfillError(f"output '{out}' is a file; give a directory for --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OverfillError(f"output directory '{out}' is not empty; choose another --out or pass --overwrite")


def _save(model, source: Path, cfg: PruneConfig, record: PruneRecord, out: Path) -> None:
    """Write to a temporary sibling and rename, so a failed run never leaves half a model behind.

    The tokenizer files are copied as they are: OverFill checks that a decoder's tokenizer is
    byte-identical to its full model's.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        record.save(tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def prune(model: str | os.PathLike, cfg: PruneConfig, out: str | os.PathLike,
          texts: list[str] | None = None, overwrite: bool = False) -> PruneRecord:
    """Prune a model reference and save the result as a Hugging Face directory in `out`.

    Calibration text comes from `cfg.calibration` unless `texts` are given.
    """
    from .hub import load_hf_config, load_hf_model, load_tokenizer, resolve

    out = Path(out)
    _check_out(out, overwrite)
    plan(load_hf_config(model), cfg)  # fail on bad flags before loading anything large
    tokenizer = load_tokenizer(model)
    hf_model = load_hf_model(model)
    record = prune_model(hf_model, tokenizer, cfg, texts, source=str(model))
    _save(hf_model, resolve(model), cfg, record, out)
    return record


def prune_command(args: PruneArgs) -> None:
    start = time.perf_counter()
    cfg = PruneConfig(**{f.name: getattr(args, f.name) for f in fields(PruneConfig)})
    record = prune(args.model, cfg, args.out, overwrite=args.overwrite)
    for name, r in record.rounding.items():
        if r["multiple"]:
            print(f"{name}: {r['target']:g} -> {r['kept']} ({r['note']})")
    full, pruned = record.full, record.pruned
    print(f"widths: hidden {full['hidden_size']} -> {pruned['hidden_size']}, "
          f"intermediate {full['intermediate_size']} -> {pruned['intermediate_size']}, "
          f"heads {full['num_attention_heads']} -> {pruned['num_attention_heads']}, "
          f"layers {full['num_hidden_layers']} -> {pruned['num_hidden_layers']}")
    print(f"parameters: {record.params_before:,} -> {record.params_after:,} "
          f"({record.bytes_after / 2**20:.1f} MiB)")
    cal = record.calibration
    print(f"importance from {cal['sequences']} sequences ({cal['tokens']:,} tokens); "
          f"loss on {cal['loss_sequences']} of them ({cal['loss_tokens']:,} tokens): "
          f"{cal['loss_before']:.3f} -> {cal['loss_after']:.3f} "
          f"(perplexity {cal['perplexity_before']:.1f} -> {cal['perplexity_after']:.1f})")
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s (pruning {record.seconds:.0f} s)")
