"""`overfill build`: the flags are BuildConfig's fields (see `overfill.build`)."""
from __future__ import annotations

from ..build import BuildConfig, build


def build_command(args: BuildConfig) -> None:
    print(f"wrote {build(args)}")
