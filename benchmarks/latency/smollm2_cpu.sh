#!/usr/bin/env sh
# Headline CPU benchmark: SmolLM2-135M-Instruct (full) and its 45%-pruned decoder, fp32, batch 1.
# Our engine eager and compiled, OverFill with and without refresh, and transformers' generate(),
# all in one run, 5 rounds round-robin. The decoder has random weights in the pruned shape unless
# DECODER names a pruned or OverFill directory (timing depends only on the shape).
set -e
cd "$(dirname "$0")/../.."
python -m overfill.cli bench --full smollm2-135m-instruct ${DECODER:+--decoder "$DECODER"} \
    --prompt-len 128 --output-len 64 --batch-size 1 --engine eager compiled --refresh-every 8 32 \
    --repeats 5 --warmup 1 --threads 1 --out benchmarks/latency/results/smollm2_cpu.json "$@"
