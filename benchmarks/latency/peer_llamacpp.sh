#!/usr/bin/env bash
# Our engine against llama.cpp on the CPU, in one round-robin run (benchmarks/latency/README.md).
#
#   bash benchmarks/latency/peer_llamacpp.sh                 # install, convert, time
#   DECODER=runs/x/pruned bash benchmarks/latency/peer_llamacpp.sh --repeats 5
#
# 1. A venv (.venv-llamacpp, beside the project's packages) with a pinned llama-cpp-python,
#    compiled from source for this CPU (-DGGML_NATIVE=ON): about 10 minutes on 2 cores, once.
# 2. The full model and the decoder converted to GGUF, f32 and bf16, by llama.cpp's own
#    convert_hf_to_gguf.py from the same source tarball (it needs sentencepiece).
# 3. peer_llamacpp.py: llama.cpp and our engine, the same shapes, round-robin.
# The decoder is a pruned directory (`overfill prune`, made here unless DECODER names one):
# llama.cpp runs it alone, as the standalone small model; we run it alone and as OverFill's decoder.
set -euo pipefail
cd "$(dirname "$0")/../.."
LLAMA_CPP_VERSION=0.3.36
VENV=${VENV:-.venv-llamacpp}
WORK=${WORK:-runs/peer_llamacpp}
PY=${PYTHON:-python3}
mkdir -p "$WORK"
if ! "$VENV/bin/python" -c "import llama_cpp, sentencepiece" 2>/dev/null; then
  "$PY" -m venv --system-site-packages "$VENV"
  "$VENV/bin/pip" download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$WORK/src"
  CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$VENV/bin/pip" install -q "$WORK/src/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz" diskcache sentencepiece
fi
CONVERTER="$WORK/src/llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp/convert_hf_to_gguf.py"
if [ ! -d "$(dirname "$CONVERTER")/conversion" ]; then
  [ -f "$WORK/src/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz" ] || "$VENV/bin/pip" download -q --no-deps \
    --no-binary :all: "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$WORK/src"
  tar -xzf "$WORK/src/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz" -C "$WORK/src" \
    "llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp/conversion" \
    "llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp/gguf-py"
fi
FULL=$("$VENV/bin/python" -c "from overfill.hub import resolve; print(resolve('smollm2-135m-instruct'))")
DECODER=${DECODER:-$WORK/pruned}
[ -f "$DECODER/model.safetensors" ] || overfill prune smollm2-135m-instruct --hidden 0.45 --intermediate 0.45 --out "$DECODER"
for name in full decoder; do
  src=$FULL; [ $name = decoder ] && src=$DECODER
  for type in f32 bf16; do
    gguf="$WORK/$name-$type.gguf"
    [ -f "$gguf" ] || "$VENV/bin/python" "$CONVERTER" "$src" --outtype $type --outfile "$gguf" > "$WORK/convert-$name-$type.log" 2>&1
  done
done
"$VENV/bin/python" benchmarks/latency/peer_llamacpp.py --full "$FULL" --decoder "$DECODER" --gguf-dir "$WORK" "$@"
