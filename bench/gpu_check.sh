#!/usr/bin/env bash
# GPU check of the fused backend (issue 3): the gpu-marked tests, then the benchmark
# (bench/gpu_check.py), all results under OUTDIR. Each part has its own time limit and a
# failure in one does not stop the next; under 6 minutes (160 s + 190 s + installing).
# Usage: bench/gpu_check.sh OUTDIR   (GPU_CHECK_ARGS: extra arguments for gpu_check.py, e.g. a CPU smoke run;
#        PROFILE_ARGS: also run bench/profile_fused.py with these arguments, e.g. "--batch 1", up to 3.5 more minutes)
set -u
PY="${PYTHON:-python3}"  # the interpreter that holds torch (python3 on the lent GPU machines)
mkdir -p "${1:-gpu_check}"
OUT="$(cd "${1:-gpu_check}" && pwd)"  # absolute: the script moves to the repository root next
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  "$PY" -c "import setuptools; print('setuptools', setuptools.__version__)"
} > "$OUT/env.txt" 2>&1
# the kernels folder is installed as advface_engine.kernels: install the package if it is not, and
# where that fails (no network for build requirements, setuptools < 77) link it into the source tree
"$PY" -c "import advface_engine.kernels.l1_sign" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/env.txt" 2>&1 \
  || { echo "pip install failed: running from the source tree" >> "$OUT/env.txt"; ln -sfn ../kernels advface_engine/kernels; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# SIGINT at the limit, so pytest still prints its summary; -rfE names what failed
timeout -s INT -k 10 160 "$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" tests \
  > "$OUT/pytest_gpu.txt" 2>&1
echo "pytest exit code $?" >> "$OUT/pytest_gpu.txt"
timeout -k 10 190 "$PY" bench/gpu_check.py --out "$OUT" --budget 130 ${GPU_CHECK_ARGS:-} > "$OUT/bench_log.txt" 2>&1
echo "benchmark exit code $?" >> "$OUT/bench_log.txt"
if [ -n "${PROFILE_ARGS:-}" ]; then  # optional, past the 6 minutes: bench/profile_fused.py, e.g. "--batch 1"
  timeout -k 10 210 "$PY" bench/profile_fused.py --out "$OUT" $PROFILE_ARGS > "$OUT/profile_log.txt" 2>&1
  echo "profile exit code $?" >> "$OUT/profile_log.txt"
fi
tail -n 15 "$OUT/pytest_gpu.txt"
tail -n 20 "$OUT/bench_log.txt"
if [ -f "$OUT/profile_log.txt" ]; then head -n 40 "$OUT/profile_log.txt"; fi
