"""Greedy agreement of bf16 decoding with fp32: the first --tokens tokens of --prompts real chats.

    python -m benchmarks.latency.bf16_agreement [--decoder DIR] [--out benchmarks/latency/results/bf16_agreement.json]

Our engine (`BatchDecoder`, one prompt at a time so padding plays no part), greedy, EOS ignored,
the same ShareGPT first turns under the chat template, in fp32 and in bf16 (weights and KV
cache), and in bf16 with the CPU kernels off (`engine/one_row.py`: the step layer by layer, bf16
logits). Per prompt: how many leading tokens agree, and the share of positions that agree.
SmolLM2's released weights are bf16; the built-in model is de-quantized from its Q4_1 GGUF.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from benchmarks.serve_load import sharegpt_prompts
from overfill.bench import machine
from overfill.engine import BatchDecoder, SamplingParams, one_row
from overfill.generate import encode
from overfill.two_stage import TwoStageModel


def greedy(model: TwoStageModel, ids: list[int], n: int) -> list[int]:
    loop = BatchDecoder(model, [ids], [SamplingParams(max_new_tokens=n, ignore_eos=True)])
    return [int(t) for t in [loop.first()] + [loop.next() for _ in range(n - 1)]]


def compare(a: list[int], b: list[int]) -> dict:
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    return {"agreeing_prefix": prefix, "agreement": sum(x == y for x, y in zip(a, b)) / len(a)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", default="smollm2-135m-instruct")
    ap.add_argument("--decoder", default=None, help="also OverFill with this decoder")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/latency/results/bf16_agreement.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompts = sharegpt_prompts(args.prompts, 400)
    systems = {"full": None} | ({"overfill": args.decoder} if args.decoder else {})
    result = {"machine": machine(torch.device("cpu")), "settings": vars(args), "systems": {}}
    for name, decoder in systems.items():
        models = {dt: TwoStageModel.from_refs(args.full, decoder, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
        rows: dict[str, list] = {name: [], f"{name}, kernels off": []}
        for text in prompts:
            ids = encode(models[torch.float32].tokenizer, text)
            fp32, bf16 = (greedy(models[dt], ids, args.tokens) for dt in (torch.float32, torch.bfloat16))
            with one_row.off():  # bf16 layer by layer on F.linear, bf16 logits
                bf16_off = greedy(models[torch.bfloat16], ids, args.tokens)
            rows[name].append({"prompt": text[:80], **compare(fp32, bf16)})
            rows[f"{name}, kernels off"].append({"prompt": text[:80], **compare(fp32, bf16_off)})
        for label, runs in rows.items():
            result["systems"][label] = s = {
                "mean_agreement": statistics.fmean(r["agreement"] for r in runs),
                "identical_prompts": sum(r["agreeing_prefix"] == args.tokens for r in runs),
                "median_agreeing_prefix": statistics.median(r["agreeing_prefix"] for r in runs), "prompts": runs}
            print(f"{label}: {s['identical_prompts']}/{len(runs)} prompts identical over {args.tokens} tokens, "
                  f"mean agreement {s['mean_agreement']:.1%}, median agreeing prefix {s['median_agreeing_prefix']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
