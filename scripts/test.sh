#!/usr/bin/env bash
# The test suite: lint, then pytest (GPU tests skip without CUDA). Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_venv.sh"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# The pytest entry point (not `python -m pytest`) keeps the checkout root off sys.path, so the
# repo's top-level kernels/ folder is never importable as `kernels`.
exec .venv/bin/pytest --durations=25 "$@"
