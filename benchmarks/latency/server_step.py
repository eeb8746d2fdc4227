"""The server's per-token cost against the static engine's, on the same compiled step.

Both run the engine's `decode_one_token`: `BatchDecoder` (a fixed batch, what `overfill generate`
and `overfill bench` run) and `ContinuousBatcher` (what `overfill serve` runs: rows join and leave,
the step runs on the live rows rounded up to a power of two, tokens go to each job's sink). The
batcher is timed per `step()`, with its host work (inputs, token hand-out, retiring rows) and
without HTTP. Round-robin, in one process, median over rounds.

    python -m benchmarks.latency.server_step --decoder DIR --out benchmarks/latency/results/server_step_cpu_amx.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import torch

from overfill.bench import machine
from overfill.device import pick_device
from overfill.engine import BatchDecoder, ContinuousBatcher, Job, SamplingParams
from overfill.two_stage import TwoStageModel


def prompts(model: TwoStageModel, batch: int, length: int) -> list[list[int]]:
    ids = model.tokenizer("The history of the printing press " * length, add_special_tokens=False)["input_ids"]
    return [ids[b:b + length] for b in range(batch)]


def time_static(model: TwoStageModel, rows: list[list[int]], tokens: int) -> list[float]:
    params = [SamplingParams(max_new_tokens=tokens, ignore_eos=True)] * len(rows)
    loop = BatchDecoder(model, rows, params, compile=True)
    loop.first()
    steps = []
    for _ in range(tokens - 1):
        start = time.perf_counter()
        loop.next().tolist()  # the server hands tokens to the host at every step too
        steps.append(time.perf_counter() - start)
    return steps


def time_batcher(batcher: ContinuousBatcher, rows: list[list[int]], tokens: int) -> list[float]:
    jobs = [Job(r, SamplingParams(max_new_tokens=tokens, ignore_eos=True), lambda event: False) for r in rows]
    batcher.admit(deque(jobs))
    steps = []
    while batcher.rows:
        start = time.perf_counter()
        batcher.step()
        steps.append(time.perf_counter() - start)
    return steps[:-1]  # the last step also retires every row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", default="smollm2-135m-instruct")
    parser.add_argument("--decoder", required=True)
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    device = pick_device("cpu")
    results = []
    for dtype in args.dtype:
        model = TwoStageModel.from_refs(args.full, args.decoder, dtype=getattr(torch, dtype), device=device)
        batcher = ContinuousBatcher(model, max_batch=max(args.batch), compile=True)
        for batch in args.batch:
            rows = prompts(model, batch, args.prompt_len)
            time_static(model, rows, 8)  # compile and warm up
            time_batcher(batcher, rows, 8)
            static, served = [], []
            for _ in range(args.rounds):
                static.append(statistics.median(time_static(model, rows, args.tokens)))
                served.append(statistics.median(time_batcher(batcher, rows, args.tokens)))
            row = {"dtype": dtype, "batch": batch, "static_ms": 1e3 * statistics.median(static),
                   "server_ms": 1e3 * statistics.median(served)}
            row["server_over_static"] = row["server_ms"] / row["static_ms"]
            results.append(row)
            print(json.dumps(row), flush=True)
    out = {"command": "python -m benchmarks.latency.server_step " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": machine(device), "prompt_len": args.prompt_len, "tokens": args.tokens, "rounds": args.rounds,
           "decoder": args.decoder, "target": "server_over_static <= 1.10 at batch 1", "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
