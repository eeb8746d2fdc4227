"""`overfill train`: the flags are TrainConfig's fields (see `overfill.train`)."""
from __future__ import annotations

import json

from ..checkpoint import SUMMARY_FILE
from ..train import TrainConfig, train


def train_command(args: TrainConfig) -> None:
    out = train(args)
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch` every process runs this command
        print(summary_line(out, json.loads((out / SUMMARY_FILE).read_text())))


def summary_line(out, summary: dict) -> str:
    """The run's summary.json in a line (precision and padding: absent from runs of older versions)."""
    padding = f", padding {summary['padding']:.1%}" if "padding" in summary else ""
    return (f"trained {summary['mode']} decoder -> {out}: {summary['steps']} steps, {summary['tokens']:,} tokens, "
            f"{summary['tokens_per_s']:.0f} tokens/s ({summary.get('precision', 'fp32')}{padding}), "
            f"final loss {summary['final_loss']}, val loss {summary['final_val_loss']}, "
            f"{summary['wall_seconds']:.0f} s")
