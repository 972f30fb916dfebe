#!/usr/bin/env bash
# GPU check for a lent CUDA machine (one H100 / H200), in one go and under ~8 minutes:
#   1. correctness of the Triton kernels (`pytest -m gpu`): every autotune config forced in turn
#      against fp32 references at tight tolerances, EVEN_K=False, odd vocabulary, no bias / no
#      entropy / frozen weight / N=1, the gradient filter, determinism, autocast, the GAE kernel,
#      int64 offsets past 2^31 (tests/ops/test_linear_logprobs_gpu.py and the gpu-marked tests);
#   2. benchmarks/gpu_timing.py: an autotuned correctness check at a training shape, then fused
#      vs eager vs a bare cuBLAS GEMM at N=8192 H=4096 V=128256 bf16, filter off / on;
#   3. benchmarks/bench_ops.py --device cuda --quick (bf16): the usual table and CSV.
# Installs nothing: it uses the machine's python3 with its own torch + triton and puts this
# checkout on PYTHONPATH. Keeps going when a step fails; exits non-zero at the end if any did.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Writes (flat, under $OUT):
#   env.txt            date, nvidia-smi before / after, python / torch / triton versions, git commit
#   pytest_gpu.log     python -m pytest tests -m gpu
#   gpu_timing.log     benchmarks/gpu_timing.py --profile
#   bench_cuda.log     benchmarks/bench_ops.py --device cuda --dtypes bf16 --quick (the table)
#   bench_cuda_bf16.csv  the benchmark figures (long format, see benchmarks/README.md)
#   exit_codes.txt     one line per step: name and exit status (124 = hit its timeout)
#
# Knobs (environment): PYTHON (python3), TEST_TIMEOUT (270 s), TIMING_TIMEOUT (120 s),
# BENCH_TIMEOUT (90 s), BENCH_ARGS (bench_ops.py arguments, default "--quick").
set -euo pipefail

: "${OUT:?set OUT to a folder for the logs and CSVs}"
mkdir -p "$OUT"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
TEST_TIMEOUT="${TEST_TIMEOUT:-270}"
TIMING_TIMEOUT="${TIMING_TIMEOUT:-120}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-90}"
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

# 1. correctness of the compiled Triton kernels (tests marked `gpu`; the forced-config tests pick
#    each config themselves, the rest run the last, any-dtype one). Exit 5 = none collected.
set +e
FASTALIGN_TRITON_AUTOTUNE=0 timeout "$TEST_TIMEOUT" "$PY" -m pytest tests -m gpu -q -p no:cacheprovider \
    --durations=15 2>&1 | tee "$OUT/pytest_gpu.log"
rc=${PIPESTATUS[0]}
set -e
record pytest_gpu "$rc"

# 2. autotuned check at a training shape, timings vs eager and cuBLAS, filter off / on.
set +e
timeout "$TIMING_TIMEOUT" "$PY" benchmarks/gpu_timing.py --profile 2>&1 | tee "$OUT/gpu_timing.log"
rc=${PIPESTATUS[0]}
set -e
record gpu_timing "$rc"

# 3. benchmarks: bf16, eager vs triton vs torch (quick CUDA shapes unless BENCH_ARGS says otherwise).
set +e
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
timeout "$BENCH_TIMEOUT" "$PY" benchmarks/bench_ops.py --device cuda --dtypes bf16 --case-timeout 60 \
    --out "$OUT/bench_cuda_bf16.csv" ${BENCH_ARGS:---quick} 2>&1 | tee "$OUT/bench_cuda.log"
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
