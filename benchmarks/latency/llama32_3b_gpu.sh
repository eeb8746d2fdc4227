#!/usr/bin/env sh
# GPU benchmark (not yet run: needs a CUDA machine): random bf16 weights in the shapes of
# Llama-3.2-3B (full), its 45%-pruned decoder (hidden 1728, MLP 4480) and Llama-3.2-1B (the
# same-size reference); no download. Our engine is compiled (CUDA graphs); transformers'
# generate() runs with its dynamic cache, then with its static cache (which it compiles).
set -e
cd "$(dirname "$0")/../.."
out=benchmarks/latency/results
python -m overfill.cli bench --shapes llama3.2-3b --prompt-len 512 --output-len 256 --batch-size 1 \
    --repeats 10 --out $out/llama32_3b_h100.json "$@"
python -m overfill.cli bench --shapes llama3.2-3b --prompt-len 512 --output-len 256 --batch-size 1 \
    --systems full hf --hf-cache static --repeats 5 --out $out/llama32_3b_h100_hf_static.json "$@"
python -m overfill.cli bench --shapes llama3.2-3b --prompt-len 128 512 2048 4096 --output-len 256 \
    --systems full decoder overfill reference --refresh-every 32 --out $out/llama32_3b_h100_prompt.json "$@"
python -m overfill.cli bench --shapes llama3.2-3b --prompt-len 512 --output-len 64 256 1024 \
    --systems full decoder overfill reference --refresh-every 32 --out $out/llama32_3b_h100_output.json "$@"
python -m overfill.cli bench --shapes llama3.2-3b --prompt-len 512 --output-len 256 --batch-size 1 8 64 \
    --systems full decoder overfill reference --refresh-every 32 --out $out/llama32_3b_h100_batch.json "$@"
