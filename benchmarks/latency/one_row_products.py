"""One-row matrix products (batch-1 decoding) on the CPU: inductor's reductions against the BLAS call.

    python -m benchmarks.latency.one_row_products --out benchmarks/latency/results/one_row_products_cpu.json

For each weight shape of SmolLM2-135M and its 45 %-pruned decoder, in bf16 and fp32, `x [1, K] @ W.T`
is timed eagerly (`F.linear`: oneDNN / MKL) and through torch.compile with the decode step's
options (`engine.CompiledStep`: inductor's decompose_mm_pass turns the product into its
own reduction), and in bf16 through the engine's one-row kernel (`engine/one_row.py`) where the
CPU has AVX512-BF16; --rows 8 times the products of a batch-8 step. Each call reads another copy
of the weight, --pool-mb of copies in all, so that they come from memory; where the L3 is larger than that (some cloud Xeons report 480 MB), part of
them come from cache and "of floor" (against `bench.measure_bandwidth`) can pass 100 %.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from overfill.bench import _median_seconds, machine, measure_bandwidth
from overfill.engine import one_row, one_row_product_options

SHAPES = {  # (out, in): what reads them
    "decoder q/o (576 x 288)": (576, 288), "decoder fused q/k/v (960 x 288)": (960, 288),
    "decoder MLP up (832 x 288)": (832, 288), "decoder fused gate/up (1664 x 288)": (1664, 288),
    "decoder MLP down (288 x 832)": (288, 832), "decoder LM head (49152 x 288)": (49152, 288),
    "full MLP up (1536 x 576)": (1536, 576), "full LM head (49152 x 576)": (49152, 576),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--pool-mb", type=float, default=300)
    ap.add_argument("--rows", type=int, default=1, help="rows of x (a decode step's batch)")
    ap.add_argument("--out", default="benchmarks/latency/results/one_row_products_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    gbps = measure_bandwidth(torch.device("cpu"))["gbps"]
    kernel = one_row.load()
    rows = []
    for precision, dtype in DTYPES.items():
        for name, (n, k) in SHAPES.items():
            pool = [torch.randn(n, k, dtype=dtype) for _ in range(max(2, int(args.pool_mb * 1e6 // (n * k * 4))))]
            linear = torch.compile(lambda x, w: F.linear(x, w), options=one_row_product_options(), dynamic=False)
            x, turn, cpu = torch.randn(args.rows, k, dtype=dtype), [0], torch.device("cpu")

            def call(fn):
                turn[0] = (turn[0] + 1) % len(pool)
                return fn(x, pool[turn[0]])

            with torch.inference_mode():
                eager = _median_seconds(lambda: call(F.linear), cpu, args.repeats) * 1e3  # ms
                compiled = _median_seconds(lambda: call(linear), cpu, args.repeats) * 1e3
                own = (_median_seconds(lambda: call(one_row.linear), cpu, args.repeats) * 1e3
                       if kernel and dtype == torch.bfloat16 else None)
            floor = pool[0].nbytes / (gbps * 1e9) * 1e3
            rows.append({"shape": name, "precision": precision, "weight_mb": pool[0].nbytes / 1e6,
                         "floor_ms": floor, "eager_ms": eager, "compiled_ms": compiled, "kernel_ms": own,
                         "eager_of_floor": floor / eager, "compiled_of_floor": floor / compiled,
                         "kernel_of_floor": floor / own if own else None})
            print(f"{precision} {name}: eager {eager:.3f} ms ({floor / eager:.0%} of floor), "
                  f"compiled {compiled:.3f} ms ({floor / compiled:.0%})"
                  + (f", kernel {own:.3f} ms ({floor / own:.0%})" if own else ""), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(torch.device("cpu")), "bandwidth_gbps": gbps,
                               "settings": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
