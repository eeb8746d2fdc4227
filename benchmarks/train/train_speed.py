"""Training throughput: the first release's path against the new one, on the same batches, round-robin.

    python benchmarks/train/train_speed.py --decoder runs/exp/pruned [--out benchmarks/train/results/NAME.json]

Both modes (OverFill: full model frozen; pruned baseline), ShareGPT micro-batches of
--batch-size examples at --max-len, one optimizer step each (forward, backward, AdamW).
Tokens/s counts prompt + response tokens, as `overfill train` does. Paths:
  reference-fp32   the first release: `losses.reference_losses` over right-padded batches, fp32
  reference-bf16   the same under bf16 autocast (full model in bf16)
  fast-fp32        `losses.response_losses` over `collate_split` batches, fp32
  fast-bf16        the same under bf16 autocast, full model stored in bf16 (what `--precision bf16` runs)
  fast-bf16-ungrouped  fast-bf16 on the first release's batches: what the length grouping adds
The fast paths run the length-grouped batches of `overfill train`, the reference paths the
first release's (the same examples in all). Each round runs every (mode, path) once, in turn,
so machine noise hits all of them alike; a path's tokens/s is its tokens over its seconds.

Then, unless --no-eval: `overfill eval`'s scoring (documents/s per task of the default suite,
first --eval-docs documents, full and overfill modes, fp32 against bf16 weights, round-robin,
and the estimate for the whole suite at 1,000 documents per task), and the pruner's
calibration pass (seconds for --calibration-batches batches of 16 x 512 tokens, fp32 and bf16).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from overfill.batching import collate, collate_split, length_groups, length_key, padding_fraction
from overfill.data import load_examples
from overfill.device import describe_machine
from overfill.losses import reference_losses, response_losses
from overfill.two_stage import TwoStageModel

PATHS = ("reference-fp32", "reference-bf16", "fast-fp32", "fast-bf16", "fast-bf16-ungrouped")


def step(path: str, mode: str, full, decoder, optimizer, examples, pad_id: int, layer_map) -> float:
    """One optimizer step; returns its seconds."""
    bf16 = "bf16" in path
    fast = path.startswith("fast")
    batch = collate_split(examples, pad_id) if fast else collate(examples, pad_id)
    loss_fn = response_losses if fast else reference_losses
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ce, _ = loss_fn(full[bf16], decoder, batch, mode, layer_map)
    (ce.sum() / response_tokens(batch)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def response_tokens(batch) -> int:
    return int(batch["response_valid"].sum() if "response_valid" in batch else batch["loss_mask"].sum())


def train_speed(args, pair, full) -> dict:
    """Round r runs batch r of every path in turn; a path's tokens/s is its tokens over its seconds."""
    decoder = pair.decoder.train()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-6)  # tiny steps: the weights barely move
    pad = pair.tokenizer.pad_token_id
    n = args.batch_size * (args.rounds + args.warmup)
    examples = load_examples("sharegpt", pair.tokenizer, "train", args.max_len, args.max_len * 3 // 4, limit=n, seed=0)
    # The first release batched the seeded order as it came; `overfill train` now groups it by length
    # (the same examples in all, other neighbours): the fast paths run the grouped plan.
    plain = list(range(n))
    grouped = length_groups(plain, [length_key(e) for e in examples], args.batch_size, n // args.batch_size, 0)
    plans = {"plain": plain, "grouped": grouped}
    seconds = {f"{m}/{p}": 0.0 for m in args.modes for p in args.paths}
    tokens = {"plain": 0, "grouped": 0}
    padding = {"plain": [], "grouped": []}
    for r in range(args.rounds + args.warmup):
        batch_of = {name: [examples[i] for i in plan[r * args.batch_size:(r + 1) * args.batch_size]]
                    for name, plan in plans.items()}
        for key in seconds:
            mode, path = key.split("/")
            plan = "grouped" if path.startswith("fast") and not path.endswith("ungrouped") else "plain"
            s = step(path, mode, full, decoder, optimizer, batch_of[plan], pad, pair.layer_map)
            if r >= args.warmup:
                seconds[key] += s
        if r >= args.warmup:
            for name, batch in batch_of.items():
                b = collate_split(batch, pad)
                tokens[name] += int(b["prompt_valid"].sum() + b["response_valid"].sum())
                padding[name].append(padding_fraction(b))
            print(f"round {r}: " + ", ".join(f"{k} {tokens['plain'] / v:.0f}" for k, v in seconds.items()),
                  file=sys.stderr, flush=True)
    results = {}
    for key, secs in seconds.items():
        mode, path = key.split("/")
        plan = "grouped" if path.startswith("fast") and not path.endswith("ungrouped") else "plain"
        results[key] = {"tokens_per_s": tokens[plan] / secs, "seconds": secs}
    for key in results:
        mode = key.split("/")[0]
        results[key]["x_reference_fp32"] = results[key]["tokens_per_s"] / results[f"{mode}/reference-fp32"]["tokens_per_s"]
    return {"batch_size": args.batch_size, "max_len": args.max_len, "rounds": args.rounds, "tokens": tokens,
            "padding_in_split_layout": {k: statistics.mean(v) for k, v in padding.items()}, "results": results}


def eval_speed(args) -> dict:
    """Documents/s of the default suite's scoring, fp32 against bf16, full and overfill, round-robin per task."""
    from overfill.evaluate import score_task
    from overfill.tasks import DEFAULT_SUITE, load_task

    models = {p: TwoStageModel.from_refs(args.full, args.decoder, dtype=d)
              for p, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    per_task, estimate = {}, {}
    for name in DEFAULT_SUITE:
        task = load_task(name, limit=args.eval_docs)
        full_size = len(load_task(name).docs)
        row = {}
        for mode in ("full", "overfill"):
            for precision, model in models.items():
                metrics = score_task(model, mode, task)
                row[f"{mode}/{precision}"] = {"docs_per_s": len(task.docs) / metrics["seconds"], "acc": metrics["acc"]}
                estimate.setdefault(f"{mode}/{precision}", 0.0)
                estimate[f"{mode}/{precision}"] += min(1000, full_size) * metrics["seconds"] / len(task.docs)
        per_task[name] = row
        print(f"eval {name}: " + ", ".join(f"{k} {v['docs_per_s']:.1f} docs/s" for k, v in row.items()),
              file=sys.stderr, flush=True)
    return {"docs_per_task": args.eval_docs, "tasks": per_task,
            "suite_1000_docs_estimate_s": {k: round(v) for k, v in estimate.items()}}


def calibration_speed(args) -> dict:
    """Seconds of the pruner's importance pass over the same calibration batches, fp32 against bf16."""
    from overfill.data import calibration_texts
    from overfill.hub import load_tokenizer
    from overfill.importance import calibration_batches, calibration_pass
    from overfill.model import load_model

    tokenizer = load_tokenizer(args.full)
    texts = calibration_texts("sharegpt", 16 * args.calibration_batches, seed=0, tokenizer=tokenizer)
    batches = calibration_batches(tokenizer, texts, 512, 16, scored=16)
    seconds = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = load_model(args.full, dtype=dtype).eval()
        started = time.perf_counter()
        calibration_pass(model, batches, f"calibration ({precision})")
        seconds[precision] = time.perf_counter() - started
    return {"batches": len(batches), "sequences": 16 * len(batches), "seq_len": 512, "seconds": seconds,
            "bf16_speedup": seconds["fp32"] / seconds["bf16"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", default="smollm2-135m-instruct")
    ap.add_argument("--decoder", required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    ap.add_argument("--modes", nargs="+", default=["overfill", "pruned"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--eval-docs", type=int, default=40)
    ap.add_argument("--calibration-batches", type=int, default=2)
    args = ap.parse_args()

    pair = TwoStageModel.from_refs(args.full, args.decoder, dtype=torch.float32)
    full = {False: pair.full.requires_grad_(False).eval(),
            True: TwoStageModel.from_refs(args.full, dtype=torch.bfloat16).full.requires_grad_(False).eval()}
    record = {"machine": describe_machine(torch.device("cpu")), "full": args.full, "decoder": args.decoder,
              "decoder_parameters": pair.decoder.args.num_params(), "train": train_speed(args, pair, full)}
    print(json.dumps({k: {kk: round(vv, 2) for kk, vv in v.items()} for k, v in record["train"]["results"].items()},
                     indent=1))
    if not args.no_eval:
        record["eval"] = eval_speed(args)
        record["calibration"] = calibration_speed(args)
        print(json.dumps({"eval": record["eval"]["suite_1000_docs_estimate_s"], "calibration": record["calibration"]},
                         indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
