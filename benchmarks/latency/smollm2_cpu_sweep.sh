#!/usr/bin/env sh
# A small CPU sweep of the SmolLM2 pair (eager engine, fp32): prompt length, output length and
# batch size, one axis at a time around prompt 128 / output 32 / batch 1.
set -e
cd "$(dirname "$0")/../.."
common="--full smollm2-135m-instruct --systems full decoder overfill hf --refresh-every 8 \
        --repeats 3 --warmup 1 --threads 1"
python -m overfill.cli bench $common --prompt-len 128 512 2048 --output-len 32 --batch-size 1 \
    --out benchmarks/latency/results/smollm2_cpu_prompt.json "$@"
python -m overfill.cli bench $common --prompt-len 128 --output-len 32 128 256 --batch-size 1 \
    --out benchmarks/latency/results/smollm2_cpu_output.json "$@"
python -m overfill.cli bench $common --prompt-len 128 --output-len 32 --batch-size 1 4 16 \
    --out benchmarks/latency/results/smollm2_cpu_batch.json "$@"
