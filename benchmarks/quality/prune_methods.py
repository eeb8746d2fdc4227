"""The calibration loss right after pruning: channel selection against the rotated cut (`overfill prune --method`).

    PYTHONPATH=. python benchmarks/quality/prune_methods.py [--model smollm2-135m-instruct] [--out docs/results]

Prunes the model with `--method select` and `--method rotate` at hidden 0.45 and 0.25 (SmolLM2-135M:
576 -> 288 and 432 channels), MLP 0.45 (1536 -> 848), with the pruner's default calibration (128
ShareGPT texts of up to 512 tokens, the loss on 32 of them), and writes prune_methods.json: per
run the loss and perplexity before and after, the sizes, and for rotate the share of the residual
stream's energy the kept width carries (against select's channels). With --ablations (the default)
it also runs rotate's two measured choices the other way: norm weights calibrated per norm instead
of the plain sqrt(D / D'), and the MLP neurons and heads scored on the full model instead of on
the model cut to D'.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import overfill.prune as prune_module
from overfill.hub import load_tokenizer, resolve
from overfill.model import load_model
from overfill.prune import PruneConfig, prune_model

WIDTHS = [(0.45, 0.45), (0.25, 0.45)]
ABLATIONS = {"norm weights calibrated per norm": {"NORM_SCALE": "calibrated"},
             "neurons and heads scored on the full model": {"RESCORE": False}}


def run(model: str, tokenizer, cfg: PruneConfig, settings: dict | None = None) -> dict:
    saved = {name: getattr(prune_module, name) for name in (settings or {})}
    for name, value in (settings or {}).items():
        setattr(prune_module, name, value)
    try:
        full = load_model(resolve(model), dtype=torch.float32)
        record = prune_model(full, tokenizer, cfg, source=model)
    finally:
        for name, value in saved.items():
            setattr(prune_module, name, value)
    cal, method = record.calibration, record.method
    row = {"method": cfg.method, "hidden": record.pruned["hidden_size"],
           "intermediate": record.pruned["intermediate_size"],
           "loss_before": round(cal["loss_before"], 4), "loss_after": round(cal["loss_after"], 4),
           "perplexity_after": round(cal["perplexity_after"], 1),
           "params_after": record.params_after, "seconds": record.seconds}
    if cfg.method == "rotate":
        row.update({key: method[key] for key in ("energy_kept", "energy_kept_by_select", "norm_scale",
                                                 "neurons_and_heads_scored", "loss_hidden_cut_only")})
    if settings:
        row["settings"] = settings
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--no-ablations", dest="ablations", action="store_false")
    args = parser.parse_args()
    tokenizer = load_tokenizer(resolve(args.model))
    start = time.perf_counter()
    runs, ablations = [], []
    for hidden, intermediate in WIDTHS:
        for method in ("select", "rotate"):
            runs.append(run(args.model, tokenizer, PruneConfig(hidden=hidden, intermediate=intermediate, method=method)))
        if args.ablations:
            for name, settings in ABLATIONS.items():
                cfg = PruneConfig(hidden=hidden, intermediate=intermediate, method="rotate")
                ablations.append({"ablation": name, **run(args.model, tokenizer, cfg, settings)})
    by = {(r["method"], r["hidden"]): r["loss_after"] for r in runs}
    result = {
        "model": args.model,
        "what": "calibration loss (mean next-token cross-entropy on the 32 scored calibration texts) right after "
                "pruning, before any training; select = today's channel selection, rotate = the residual stream "
                "rotated onto its principal directions (one Q for all layers) before the cut",
        "calibration": {k: v for k, v in vars(PruneConfig()).items()
                        if k in ("calibration", "samples", "loss_samples", "seq_len", "seed", "precision")},
        "runs": runs,
        "ablations": ablations,
        "notes": ["rotate unties lm_head from the embedding (the final norm folds into lm_head only), so on a tied "
                  "model params_after counts vocab x D' more; a decode step reads about the same bytes (the "
                  "embedding gives one row)", "loss_hidden_cut_only: rotate's model after the hidden cut alone "
                  "(MLP and heads whole), where the neurons and heads are scored again"],
        "rotate_minus_select": {str(h): round(by[("rotate", h)] - by[("select", h)], 4)
                                for h in sorted({r["hidden"] for r in runs})},
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - start),
    }
    out = Path(args.out) / "prune_methods.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
