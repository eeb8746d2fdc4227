"""Minitron-style structured pruning that keeps the KV cache compatible (arXiv 2407.14679).

The decoder of an OverFill pair is a dense copy of the full model with fewer hidden channels,
MLP neurons and (optionally) query heads or layers. It must read the full model's KV cache as
it is, so every KV head and the head size are kept, query heads are removed evenly inside each
GQA group, and a depth-pruned decoder records which full-model layer's KV each of its layers
reads (`layer_map`).

The pruner runs on our own `Transformer`: importance comes from activations on calibration
text, in one pass over the full model (`overfill.importance`); the least important units are
then sliced out of its parameters and the pruned `ModelArgs` written into the source's config.json.

The hidden width is cut one of two ways (`--method`):
- rotate (the default): the norms are folded into the layers that read them, the residual stream
  is rotated onto its principal directions (one orthogonal matrix for all layers, so the model
  stays a plain Llama / Qwen; `overfill.rotate`) and the first D' coordinates are kept; the MLP
  neurons and heads are then scored again on the model cut to D' (a second calibration pass).
  lm_head is untied from the embedding. On SmolLM2-135M it cuts the calibration loss right after
  pruning from 8.87 to 7.10 at hidden 288 and from 7.86 to 4.80 at 432 (docs/results/prune_methods.json);
- select: the D' most important channels, every kept weight as it was.

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
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from .errors import OverfillError
from .files import check_not_an_input, check_output_dir, json_loads, staged_dir, write_errors_as_one_line
from .device import AUTO_PRECISION_HELP, pick_device, resolve_precision
from .importance import (Aggregate, Importance, ImportanceHooks, calibration_batches, calibration_pass,
                         calibration_summary, calibration_texts)
from .model import Block, Fusable, ModelArgs, Transformer, load_model, read_config, save_model
from .rotate import fold_norms, kept_energy, norm_scales, norms, principal_rotation, rotate

RECORD_FILE = "prune_record.json"
CONFIG_FILE = "prune_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
COPIED_FILES = TOKENIZER_FILES + ("generation_config.json",)
OUTPUT_FILES = {"config.json", "model.safetensors", RECORD_FILE, CONFIG_FILE, *COPIED_FILES}
"""Everything a prune output holds: what --overwrite may replace."""


@dataclass
class PruneConfig:
    """What to remove and how to measure importance. Saved beside the pruned model."""

    method: Literal["select", "rotate"] = field(default="rotate", metadata={
        "help": "how the hidden width is cut: rotate = turn the residual stream onto its principal directions "
                "(one rotation for all layers, SliceGPT-style) and keep the first ones, with the norms folded and "
                "lm_head untied; select = keep the most important channels as they are (Minitron). rotate is the "
                "default: it leaves a much lower loss (docs/results/prune_methods.json)"})
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
    multiple: int = field(default=16, metadata={
        "help": "round hidden and MLP widths to a multiple of this (16: a bf16 AMX tile's rows and the layer "
                "stack's blocks; the hidden width is also a multiple of the attention heads)"})
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
    def of(cls, args: ModelArgs) -> "Widths":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


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
    method: dict = field(default_factory=lambda: {"name": "select"})
    """How the hidden width was cut (select or rotate), why, and for rotate what the rotation kept."""

    def save(self, out: str | os.PathLike) -> None:
        (Path(out) / RECORD_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PruneRecord":
        file = Path(path) / RECORD_FILE
        try:
            return cls(**json_loads(file.read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise OverfillError(f"cannot read the pruning record {file}: {e}") from None


# ---------------------------------------------------------------------------- planning widths

def plan(config: ModelArgs | dict, cfg: PruneConfig) -> PrunePlan:
    """Validate the request against a model and choose every kept width.

    config: the model's ModelArgs, or its config.json (a dict or a transformers config object),
    which must describe a model OverFill can run (`ModelArgs.from_hf` checks it).
    """
    _check_settings(cfg)
    full = Widths.of(config if isinstance(config, ModelArgs) else ModelArgs.from_hf(config))
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


def apply(model: Transformer, kept: Kept, pruned: Widths) -> None:
    """Cut the model in place down to the kept units and update its args."""
    body = model.model
    body.layers = nn.ModuleList([body.layers[i] for i in kept.layers])
    h = kept.hidden
    body.embed_tokens.weight = _take(body.embed_tokens.weight, h, 1)  # [V, D]
    body.embed_tokens.embedding_dim = len(h)
    body.norm.weight = _take(body.norm.weight, h, 0)
    for layer, neurons, heads in zip(body.layers, kept.neurons, kept.heads):
        _slice_block(layer, h, neurons, _head_rows(heads, pruned.head_dim))
    if model.args.tie_word_embeddings:
        model.tie_weights()
    else:
        _slice_linear(model.lm_head, in_index=h)
    model.args = replace(model.args, **asdict(pruned))


def _slice_block(block: Block, h: Tensor, neurons: Tensor, rows: Tensor) -> None:
    """h [D'] hidden channels, neurons [F'], rows [H' * head_dim] of q_proj: the kept ones.

    Qwen3's q_norm / k_norm act on the head_dim channels of each head, with one weight shared
    by all heads, and the head size is kept: neither heads nor hidden channels touch them.
    """
    attn, mlp = block.self_attn, block.mlp
    fused = [m for m in (attn, mlp) if _unfuse(m)]
    for norm in (block.input_layernorm, block.post_attention_layernorm):
        norm.weight = _take(norm.weight, h, 0)
    _slice_linear(attn.q_proj, out_index=rows, in_index=h)
    _slice_linear(attn.k_proj, in_index=h)
    _slice_linear(attn.v_proj, in_index=h)
    _slice_linear(attn.o_proj, out_index=h, in_index=rows)
    attn.n_heads = len(rows) // attn.head_dim
    _slice_linear(mlp.gate_proj, out_index=neurons, in_index=h)
    _slice_linear(mlp.up_proj, out_index=neurons, in_index=h)
    _slice_linear(mlp.down_proj, out_index=h, in_index=neurons)
    for module in fused:
        module.fuse()


def _unfuse(module: Fusable) -> bool:
    """Drop a fused buffer (slicing replaces the parameters that are views of it); whether there was one."""
    if not module.is_fused:
        return False
    module.fused_weight = module.fused_bias = None
    return True


# ---------------------------------------------------------------------------- the whole run

def _size(model) -> tuple[int, int]:
    params = list(model.parameters())  # shared (tied) parameters appear once
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _share(scores: Tensor, kept: Tensor) -> float:
    """Fraction of the total importance that the kept units carry."""
    total = scores.sum().item()
    return round(scores[kept.to(scores.device)].sum().item() / total, 6) if total > 0 else 1.0


def _summary(importance: Importance, kept: Kept, hidden_share: float | None = None) -> dict:
    """hidden_share: what the kept hidden width carries where it is not a set of channels (rotate: the energy share)."""
    return {
        "hidden_kept_share": _share(importance.hidden, kept.hidden) if hidden_share is None else hidden_share,
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


def prune_model(model: Transformer, tokenizer, cfg: PruneConfig, texts: list[str] | None = None,
                source: str = "<in memory>") -> PruneRecord:
    """Prune a loaded Transformer in place and describe what was done.

    Calibration text comes from `cfg.calibration` unless `texts` are given.
    """
    start = time.perf_counter()
    pruning = plan(model.args, cfg)
    texts_used = calibration_texts(cfg.calibration, cfg.samples, cfg.seed, tokenizer, texts)
    batches = calibration_batches(tokenizer, texts_used, cfg.seq_len, cfg.batch_size, scored=cfg.loss_samples)
    params_before, bytes_before = _size(model)
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    print(f"calibration in {precision.name} ({precision.reason})", flush=True)
    work = _working_copy(model.eval(), precision.dtype, device)
    depth_pruned = pruning.pruned.num_hidden_layers < pruning.full.num_hidden_layers
    rotating = cfg.method == "rotate"
    with ImportanceHooks(work, cfg.seq_aggregate, cfg.batch_aggregate,
                         blocks=depth_pruned and cfg.depth_method == "cosine", covariance=rotating) as hooks:
        loss_before = calibration_pass(work, batches, "importance", hooks)
    importance = hooks.result()
    kept = choose(importance, pruning, cfg.depth_method)
    if rotating:
        del work  # a copy of the unrotated model, if any
        kept, method, work, rescored = _rotate_and_slice_hidden(model, importance, kept, pruning, cfg, batches,
                                                                precision.dtype, device)
        summary = _summary(rescored, kept, hidden_share=method["energy_kept"])
    else:
        method = {"name": "select", "why": _why(cfg.method)}
        summary = _summary(importance, kept)
    apply(model, kept, pruning.pruned)
    if work is not model:
        apply(work, kept, pruning.pruned)
    loss_after = calibration_pass(work, [b for b in batches if b.scored], "pruned loss")
    params_after, bytes_after = _size(model)
    return PruneRecord(
        source=source, architecture=model.args.model_type, config={**asdict(cfg), **precision.as_dict()},
        full=asdict(pruning.full), pruned=asdict(pruning.pruned),
        rounding={name: asdict(r) for name, r in pruning.rounding.items()},
        kept={"hidden": kept.hidden.tolist(), "layers": kept.layers,
              "intermediate": [n.tolist() for n in kept.neurons], "heads": [h.tolist() for h in kept.heads]},
        layer_map=kept.layers if depth_pruned else None,
        importance=summary,
        params_before=params_before, params_after=params_after, bytes_before=bytes_before, bytes_after=bytes_after,
        calibration=calibration_summary(cfg.calibration if texts is None else "<texts given>", batches,
                                        loss_before, loss_after),
        seconds=round(time.perf_counter() - start, 1),
        method=method,
    )


NORM_SCALE = "plain"
"""Each norm's weight after a rotated cut: plain sqrt(D / D'), or calibrated per norm to the energy it keeps
(`rotate.norm_scales`). Measured on SmolLM2-135M (docs/results/prune_methods.json): calibrated was 0.07 better at
hidden 288 and 0.11 worse at 432, so the plain one stays."""
RESCORE = True
"""Score the MLP neurons and heads again on the model rotated and cut to D' (one more calibration pass) rather
than reuse the full model's scores: 1.17 lower loss at hidden 288, 0.09 at 432 (docs/results/prune_methods.json)."""

METHODS = {
    "select": "keeps the D' residual channels with the most activation (Minitron); every weight keeps its values",
    "rotate": "rotates the residual stream onto its principal directions (one orthogonal Q for all layers, "
              "SliceGPT-style) and keeps the first D' of them, which carry more of the stream than any D' channels "
              "do; the norms are folded into the layers that read them (lm_head untied) and each norm's weight "
              "becomes one scalar; on SmolLM2-135M it leaves a much lower calibration loss than select at hidden "
              "288 and 432 (docs/results/prune_methods.json)",
}


def _why(method: str) -> str:
    given = "the default" if method == PruneConfig.method else "asked for with --method " + method
    return f"{method} ({given}): {METHODS[method]}"


def _rotate_and_slice_hidden(model: Transformer, importance: Importance, kept: Kept, pruning: PrunePlan,
                             cfg: PruneConfig, batches, dtype: torch.dtype, device: torch.device
                             ) -> tuple[Kept, dict, Transformer, Importance]:
    """`--method rotate` up to the neurons and heads: fold, rotate, cut the hidden width (and score the rest again).

    `kept` is what select chose. Returns what stays (hidden: the first D' rotated coordinates;
    neurons and heads scored on the model cut to D' if RESCORE; layers as `kept` has them), the
    record's `method` entry, the working copy of the model cut to D', and the importance the
    neurons and heads were chosen by.
    """
    full, cut = pruning.full.hidden_size, pruning.pruned.hidden_size
    total = importance.covariance.sum(0)
    Q, eigenvalues = principal_rotation(total)
    energy = kept_energy(importance.covariance, Q, cut)  # [2L + 1]
    scales = norm_scales(NORM_SCALE, full, cut, energy).expand(len(energy))
    fold_norms(model)
    rotate(model, Q)
    hidden = torch.arange(cut)
    layers = pruning.full.num_hidden_layers
    everything = Kept(hidden, list(range(layers)), [torch.arange(pruning.full.intermediate_size)] * layers,
                      [torch.arange(pruning.full.num_attention_heads)] * layers)
    apply(model, everything, replace(pruning.full, hidden_size=cut))
    with torch.no_grad():
        for norm, scale in zip(norms(model), scales):
            norm.weight.fill_(scale.item())
    work = _working_copy(model, dtype, device)
    scores, loss_hidden = importance, None
    if RESCORE:
        with ImportanceHooks(work, cfg.seq_aggregate, cfg.batch_aggregate) as hooks:
            loss_hidden = calibration_pass(work, batches, "importance at the cut width", hooks)
        scores = replace(hooks.result(), blocks=importance.blocks)  # the layers are chosen on the full model
    select_energy = total.diagonal()[kept.hidden].sum() / total.trace()  # what select's channels carry
    kept = replace(choose(scores, pruning, cfg.depth_method), hidden=hidden)
    method = {
        "name": "rotate", "why": _why("rotate"),
        "energy_kept": round(kept_energy(total, Q, cut).item(), 6),
        "energy_kept_by_select": round(select_energy.item(), 6),
        "energy_kept_per_norm": [round(v, 6) for v in energy.tolist()],
        "norm_scale": NORM_SCALE, "norm_weights": [round(v, 6) for v in scales.tolist()],
        "neurons_and_heads_scored": "on the model cut to D'" if RESCORE else "on the full model",
        "loss_hidden_cut_only": loss_hidden,
        "eigenvalue_share": [round(v, 6) for v in (eigenvalues / eigenvalues.sum()).tolist()],
    }
    return kept, method, work, scores


def _check_out(out: Path, overwrite: bool, inputs: dict[str, Path | None]) -> None:
    """--out: writable, no input, and new or empty; with --overwrite, a previous prune output too
    (publishing replaces the whole directory, so nothing else may be in it)."""
    check_output_dir(out)
    check_not_an_input(out, inputs)
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not overwrite:
        raise OverfillError(f"output directory '{out}' is not empty; choose another --out or pass --overwrite")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES)
    if foreign or not (out / RECORD_FILE).is_file():
        held = f"it holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}, which prune does not write" \
            if foreign else f"it has no {RECORD_FILE}"
        raise OverfillError(f"--overwrite replaces only a previous prune output, and '{out}' is none ({held}); "
                            f"choose another --out")


def pruned_config(source: dict, model: Transformer, layers: list[int]) -> dict:
    """The source's config.json with the model's (pruned) widths, and tie_word_embeddings where rotating untied it.

    Every other key (architectures, rope, token ids, ...) still applies and stays. head_dim
    and num_key_value_heads are always written: neither follows from the pruned widths.
    """
    config = {**source, **asdict(Widths.of(model.args))}
    if bool(source.get("tie_word_embeddings", False)) != model.args.tie_word_embeddings:  # rotate unties
        config["tie_word_embeddings"] = model.args.tie_word_embeddings
    if source.get("layer_types") is not None:
        config["layer_types"] = [source["layer_types"][i] for i in layers]
    config["dtype"] = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    if "torch_dtype" in config:  # the name before transformers 5
        config["torch_dtype"] = config["dtype"]
    return config


def _save(model: Transformer, source: Path, config: dict, cfg: PruneConfig, record: PruneRecord, out: Path) -> None:
    """Write to a temporary sibling and rename, so a failed run never leaves half a model behind.

    The tokenizer files are copied as they are: OverFill checks that a decoder's tokenizer is
    byte-identical to its full model's.
    """
    with staged_dir(out) as tmp:
        written = pruned_config(config, model, record.kept["layers"])
        (tmp / "config.json").write_text(json.dumps(written, indent=2) + "\n")
        for name in COPIED_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        save_model(model, tmp, config_from=tmp)  # the weights; the rest is in place already
        record.save(tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2))


def prune(model: str | os.PathLike, cfg: PruneConfig, out: str | os.PathLike,
          texts: list[str] | None = None, overwrite: bool = False) -> PruneRecord:
    """Prune a model reference and save the result as a Hugging Face directory in `out`.

    Calibration text comes from `cfg.calibration` unless `texts` are given.
    """
    from .hub import load_tokenizer, local_path, resolve

    out = Path(out)
    _check_out(out, overwrite, {"MODEL": local_path(model), "--calibration": local_path(cfg.calibration)})
    source = resolve(model)
    config = read_config(source)
    plan(config, cfg)  # fail on bad flags before loading anything large
    tokenizer = load_tokenizer(source)
    full = load_model(source, dtype=torch.float32)  # fp32 whatever the checkpoint's dtype, as the pruner always did
    record = prune_model(full, tokenizer, cfg, texts, source=str(model))
    with write_errors_as_one_line(out):
        _save(full, source, config, cfg, record, out)
    return record

