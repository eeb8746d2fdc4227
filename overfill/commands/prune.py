"""`overfill prune`: width (and depth) pruning that keeps the KV cache (see `overfill.prune`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

from ..prune import PruneConfig, PruneRecord, prune


@dataclass(kw_only=True)
class PruneArgs(PruneConfig):
    """`overfill prune`: the PruneConfig plus where the model comes from and goes to."""

    model: str = field(metadata={"help": "model to prune: built-in name, HF directory or hub id", "positional": True})
    out: str = field(default="pruned", metadata={"help": "output directory (a Hugging Face model directory)"})
    overwrite: bool = field(default=False, metadata={"help": "replace the output directory if it exists"})


def prune_command(args: PruneArgs) -> None:
    start = time.perf_counter()
    cfg = PruneConfig(**{f.name: getattr(args, f.name) for f in fields(PruneConfig)})
    record = prune(args.model, cfg, args.out, overwrite=args.overwrite)
    print(summary(record))
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s (pruning {record.seconds:.0f} s)")


def summary(record: PruneRecord) -> str:
    """The roundings, widths, sizes and calibration losses of a pruning, as lines of text."""
    lines = [f"{name}: {r['target']:g} -> {r['kept']} ({r['note']})"
             for name, r in record.rounding.items() if r["multiple"]]
    full, pruned = record.full, record.pruned
    lines.append(f"widths: hidden {full['hidden_size']} -> {pruned['hidden_size']}, "
                 f"intermediate {full['intermediate_size']} -> {pruned['intermediate_size']}, "
                 f"heads {full['num_attention_heads']} -> {pruned['num_attention_heads']}, "
                 f"layers {full['num_hidden_layers']} -> {pruned['num_hidden_layers']}")
    method = record.method
    if method["name"] == "rotate":
        lines.append(f"method: rotate (principal directions of the residual stream; the kept {pruned['hidden_size']} "
                     f"carry {method['energy_kept']:.1%} of its energy, the best {pruned['hidden_size']} channels "
                     f"{method['energy_kept_by_select']:.1%}; lm_head untied)")
    else:
        lines.append("method: select (the most important hidden channels)")
    lines.append(f"parameters: {record.params_before:,} -> {record.params_after:,} "
                 f"({record.bytes_after / 2**20:.1f} MiB)")
    cal = record.calibration
    lines.append(f"importance from {cal['sequences']} sequences ({cal['tokens']:,} tokens); "
                 f"loss on {cal['loss_sequences']} of them ({cal['loss_tokens']:,} tokens): "
                 f"{cal['loss_before']:.3f} -> {cal['loss_after']:.3f} "
                 f"(perplexity {cal['perplexity_before']:.1f} -> {cal['perplexity_after']:.1f})")
    return "\n".join(lines)
