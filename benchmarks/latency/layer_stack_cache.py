"""The bf16 decode step with its weights in the last-level cache and out of it, on the CPU.

    python -m benchmarks.latency.layer_stack_cache --decoder DIR [--out benchmarks/latency/results/layer_stack_cache_cpu_amx.json]

Some cloud Xeons show a last-level cache larger than a small decoder (480 MiB against the 98 MB
a step of SmolLM2's pruned decoder reads in bf16), so a step can read part of its weights from the cache, and its
fraction of the DRAM floor (`bench.measure_bandwidth`, 256 MB buffers) overstates what a machine
whose weights do not fit would get. This times one decode step of the engine (`BatchDecoder`,
decoder alone, batch 1), round-robin: "warm" right after the previous step, "evicted" after a
read of --evict-mb of other memory, for the layer stack (`engine/one_row.py`) and, with the
kernels off, inductor's compiled step. Also the read bandwidth of a buffer the decoder's size,
summed again and again (from the cache where it fits).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from overfill.bench import floor_seconds, machine, measure_bandwidth, weight_bytes_per_step
from overfill.engine import BatchDecoder, SamplingParams, one_row
from overfill.model import load_model
from overfill.two_stage import TwoStageModel


class PadOnly:
    pad_token_id, eos_token_id = 0, 2


def step_times(model: TwoStageModel, prompt: list[int], steps: int, evict: torch.Tensor | None) -> list[float]:
    """Seconds of each decode step after the first token; `evict` is read before each step."""
    loop = BatchDecoder(model, [prompt], [SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)], compile=True)
    loop.first()
    times = []
    for _ in range(steps):
        if evict is not None:
            evict.sum()
        start = time.perf_counter()
        loop.next()
        times.append(time.perf_counter() - start)
    return times


def read_gbps(nbytes: int, repeats: int = 20) -> float:
    x = torch.ones(nbytes // 4)
    x.sum()
    start = time.perf_counter()
    for _ in range(repeats):
        x.sum()
    return nbytes * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--decoder", required=True)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=63)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--evict-mb", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/latency/results/layer_stack_cache_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    decoder = load_model(args.decoder, dtype=torch.bfloat16)
    model = TwoStageModel(decoder, decoder, PadOnly())
    prompt = torch.randint(decoder.args.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    evict = torch.ones(args.evict_mb * (1 << 20) // 4)
    cases = {"stack, warm": (False, None), "stack, evicted": (False, evict),
             "inductor, warm": (True, None), "inductor, evicted": (True, evict)}
    if not one_row.enabled():
        raise SystemExit("the layer stack is not available here (no AVX512-BF16, or OVERFILL_ONE_ROW_KERNEL=0)")
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(args.rounds + 1):  # round 0 warms up (and compiles)
        for name, (kernels_off, buffer) in cases.items():
            if kernels_off:
                with one_row.off():
                    t = step_times(model, prompt, args.steps, buffer)
            else:
                t = step_times(model, prompt, args.steps, buffer)
            if round_:
                times[name] += t
    bandwidth = measure_bandwidth(torch.device("cpu"))
    weights = weight_bytes_per_step(decoder)
    floor = floor_seconds(decoder, 1, args.prompt_len, args.steps + 1, bandwidth["gbps"])
    result = {"machine": machine(torch.device("cpu")), "settings": vars(args), "bandwidth": bandwidth,
              "read_gbps_at_weight_size": read_gbps(weights), "weight_bytes_per_step": weights, "floor_s": floor,
              "cases": {name: {"tpot_s": float(np.median(t)), "p90_s": float(np.percentile(t, 90)),
                               "floor_fraction": floor / float(np.median(t))} for name, t in times.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for name, r in result["cases"].items():
        print(f"{name}: {r['tpot_s'] * 1e3:.2f} ms per step, {r['floor_fraction']:.0%} of the DRAM floor")
    print(f"read bandwidth at {weights / 1e6:.0f} MB: {result['read_gbps_at_weight_size']:.1f} GB/s; "
          f"DRAM (256 MB): {bandwidth['gbps']:.1f} GB/s; wrote {out}")


if __name__ == "__main__":
    main()
