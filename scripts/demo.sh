#!/usr/bin/env bash
# The main job. Until the trainers land it is the fused-kernel benchmark in quick mode.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_venv.sh"
exec .venv/bin/python benchmarks/bench_ops.py --quick "$@"
