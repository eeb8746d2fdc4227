"""`overfill teach`: the full model writes the responses to the training prompts (see `overfill.teach`)."""
from __future__ import annotations

from ..teach import TeachConfig, teach


def teach_command(args: TeachConfig) -> None:
    out = teach(args)
    print(f"wrote {out} (settings in {out}.meta.json); train on it with --data {out}")
