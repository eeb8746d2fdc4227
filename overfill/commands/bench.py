"""`overfill bench`: the flags are BenchConfig's fields (see `overfill.bench`)."""
from __future__ import annotations

from ..bench import BenchConfig, bench


def bench_command(args: BenchConfig) -> None:
    written = bench(args)
    print(written[1].read_text())  # the markdown table
    print("wrote " + ", ".join(map(str, written)))
