#!/usr/bin/env sh
# GPU benchmark (needs a CUDA machine): random bf16 weights in the shapes of
# Llama-3.2-3B (full), its 45%-pruned decoder (hidden 1728, MLP 4480) and Llama-3.2-1B (the
# same-size reference); no download. Our engine is compiled (CUDA graphs); transformers'
# generate() runs with its dynamic cache, then with its static cache (which it compiles).
set -e
cd "$(dirname "$0")/../.."
out=benchmarks/latency/results
# Result names follow the GPU: "NVIDIA H200" -> llama32_3b_h200*.json (GPU=name overrides).
gpu=${GPU:-$(python - <<'PY'
import re, torch
if torch.cuda.is_available():
    name = torch.cuda.get_device_name()  # "NVIDIA H200", "NVIDIA H100 80GB HBM3", ...
    model = re.search(r"\b[A-Z]+[0-9]+[A-Z]?\b", name)
    print((model.group(0) if model else re.sub(r"[^A-Za-z0-9]+", "_", name)).lower())
PY
)}
[ -n "$gpu" ] || { echo "no CUDA device: this benchmark is for a GPU" >&2; exit 2; }
python -m overfill.cli bench --shapes llama3.2-3b --prompt-len 512 --output-len 256 --batch-size 1 \
    --repeats 10 --out $out/llama32_3b_${gpu}.json "$@"
python -m overfill.cli bench --shapes llama3.2-3b --prompt-len 512 --output-len 256 --batch-size 1 \
    --systems full hf --hf-cache static --repeats 5 --out $out/llama32_3b_${gpu}_hf_static.json "$@"
python -m overfill.cli bench --shapes llama3.2-3b --prompt-len 128 512 2048 4096 --output-len 256 \
    --systems full decoder overfill reference --refresh-every 32 --out $out/llama32_3b_${gpu}_prompt.json "$@"
python -m overfill.cli bench --shapes llama3.2-3b --prompt-len 512 --output-len 64 256 1024 \
    --systems full decoder overfill reference --refresh-every 32 --out $out/llama32_3b_${gpu}_output.json "$@"
python -m overfill.cli bench --shapes llama3.2-3b --prompt-len 512 --output-len 256 --batch-size 1 8 64 \
    --systems full decoder overfill reference --refresh-every 32 --out $out/llama32_3b_${gpu}_batch.json "$@"
