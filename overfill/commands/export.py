"""`overfill export`: an OverFill pair as a directory another engine serves (see `overfill.export`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..export import export_vllm


@dataclass
class ExportArgs:
    decoder: str = field(metadata={"help": "an OverFill directory (overfill train --mode overfill)",
                                   "positional": True})
    out: str = field(metadata={"help": "directory to write"})
    format: Literal["vllm"] = field(default="vllm", metadata={"help": "what to export for"})
    full: str | None = field(default=None, metadata={"help": "full model (default: the one its overfill.json names)"})
    tensor_parallel_size: int = field(default=1, metadata={
        "help": "the TP size it will be served with: checked to divide the heads and widths of both models"})
    no_refresh: bool = field(default=False, metadata={
        "help": "serve a decoder whose overfill.json sets refresh_every without the refresh (vLLM does not do it)"})


def export_command(args: ExportArgs) -> None:
    out = export_vllm(args.decoder, args.out, args.full, args.tensor_parallel_size, args.no_refresh)
    print(f"wrote {out}: serve it with `vllm serve {out}` (vLLM with overfill installed beside it)")
