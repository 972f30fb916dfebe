#!/usr/bin/env bash
# GPU check for a lent CUDA machine (written for one H200): correctness tests of the Triton
# kernels (`pytest -m gpu`), then the CUDA benchmarks in bf16 at full shapes (eager vs triton vs
# torch). Installs nothing: it uses the machine's python3 with its own torch + triton and puts
# this checkout on PYTHONPATH. Keeps going to the benchmarks when the tests fail; exits non-zero
# at the end if any step failed.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Writes (at most 6 files, flat, under $OUT):
#   env.txt            date, nvidia-smi before / after, python / torch / triton versions, git commit
#   pytest_gpu.log     python -m pytest tests -m gpu -q
#   bench_cuda.log     benchmarks/bench_ops.py --device cuda --dtypes bf16 (the table)
#   bench_cuda_bf16.csv  the benchmark figures (long format, see benchmarks/README.md)
#   exit_codes.txt     one line per step: name and exit status (124 = hit its timeout)
#
# Knobs (environment): PYTHON (python3), TEST_TIMEOUT (240 s), BENCH_TIMEOUT (300 s),
# BENCH_ARGS (extra bench_ops.py arguments, e.g. "--quick" or "--linear-shapes 4096x576x49152").
set -euo pipefail

: "${OUT:?set OUT to a folder for the logs and CSVs}"
mkdir -p "$OUT"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
TEST_TIMEOUT="${TEST_TIMEOUT:-240}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-300}"
export PYTHONUNBUFFERED=1
: >"$OUT/exit_codes.txt"
status=0

record() { # name rc
    echo "$1 $2" >>"$OUT/exit_codes.txt"
    echo "== $1: exit status $2"
    if [ "$2" -ne 0 ]; then status=1; fi
}

# fastalign without installing it: if the checkout is not importable as installed (kernels/ is
# fastalign.kernels and csrc/ is fastalign.csrc only through setup.py's package_dir), lay out
# the package with symbolic links in a temporary folder and put that first on PYTHONPATH.
if ! "$PY" -c "import fastalign.kernels, fastalign.csrc" >/dev/null 2>&1; then
    SHIM="$(mktemp -d)"
    mkdir -p "$SHIM/fastalign"
    for entry in "$REPO"/fastalign/*; do
        ln -s "$entry" "$SHIM/fastalign/$(basename "$entry")"
    done
    ln -sfn "$REPO/kernels" "$SHIM/fastalign/kernels"
    ln -sfn "$REPO/csrc" "$SHIM/fastalign/csrc"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "host: $(hostname)  repo: $REPO  PYTHONPATH: ${PYTHONPATH:-}"
    echo "commit: $("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); import benchlib; print(benchlib.git_commit())' 2>/dev/null || echo unknown)"
    echo
    echo "== nvidia-smi (before)"
    nvidia-smi || echo "nvidia-smi failed: $?"
    echo
    echo "== python"
    "$PY" - <<'EOF' || echo "python / torch import failed: $?"
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"{p.multi_processor_count} SMs")
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton import failed:", exc)
import fastalign.ops, fastalign.kernels
print("fastalign from", fastalign.ops.__file__)
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. correctness of the compiled Triton kernels (tests marked `gpu`). Exit 5 = none collected.
set +e
FASTALIGN_TRITON_AUTOTUNE=0 timeout "$TEST_TIMEOUT" "$PY" -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"
rc=${PIPESTATUS[0]}
set -e
record pytest_gpu "$rc"

# 2. benchmarks: bf16, full CUDA shapes, eager vs triton vs torch.
set +e
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
timeout "$BENCH_TIMEOUT" "$PY" benchmarks/bench_ops.py --device cuda --dtypes bf16 --case-timeout 90 \
    --out "$OUT/bench_cuda_bf16.csv" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_cuda.log"
rc=${PIPESTATUS[0]}
set -e
record bench_cuda "$rc"

{
    echo
    echo "== nvidia-smi (after), $(date -u '+%H:%M:%S UTC')"
    nvidia-smi || true
} >>"$OUT/env.txt" 2>&1

echo "== exit codes:"
cat "$OUT/exit_codes.txt"
exit "$status"
