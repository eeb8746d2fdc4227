"""The decoder's starting point: the calibration loss right after pruning, at several width ratios.

    python benchmarks/quality/prune_losses.py --out docs/results/prune_losses.json

Each ratio pair is pruned from SmolLM2-135M-Instruct with `overfill prune`'s defaults (128 ShareGPT
calibration chats, the loss on 32 of them before and after) into a temporary directory; the JSON
keeps the widths, parameters and losses. Hidden widths are multiples of lcm(16, 9 heads) = 144.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

RATIOS = [(0.25, 0.0), (0.0, 0.45), (0.25, 0.25), (0.25, 0.45), (0.45, 0.45), (0.5, 0.5), (0.5, 0.65)]


def main() -> None:
    from overfill.device import cpu_model
    from overfill.prune import PruneConfig, prune

    ap = argparse.ArgumentParser()
    ap.add_argument("--full", default="smollm2-135m-instruct")
    ap.add_argument("--out", default="docs/results/prune_losses.json")
    args = ap.parse_args()
    rows = []
    for hidden, intermediate in RATIOS:
        with tempfile.TemporaryDirectory() as tmp:
            record = prune(args.full, PruneConfig(hidden=hidden, intermediate=intermediate), Path(tmp) / "p")
        cal = record.calibration
        rows.append({"hidden_ratio": hidden, "intermediate_ratio": intermediate,
                     "hidden_size": record.pruned["hidden_size"], "intermediate_size": record.pruned["intermediate_size"],
                     "params": record.params_after, "params_fraction": round(record.params_after / record.params_before, 3),
                     "loss_before": round(cal["loss_before"], 4), "loss_after": round(cal["loss_after"], 4),
                     "perplexity_after": round(cal["perplexity_after"], 1)})
        print(rows[-1], flush=True)
    Path(args.out).write_text(json.dumps({"full": args.full, "cpu": cpu_model(), "method": "activation-based channel "
                                          "selection (overfill prune, Minitron-style)", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
