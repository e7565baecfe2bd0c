#!/usr/bin/env bash
# The checks of a session that has a GPU (run from the repository root on the GPU
# machine, with .whl/ carried): install what the machine lacks from carried wheels, run
# the test suite on the cupy backend, one training epoch on the GPU, and the GPU
# benchmarks. Writes gpu_check.log, pytest.xml, train_summary.json, gpu.json and gpu.png
# to $OUT. Meant to finish in under 8 minutes.
#
#   here:   python3 -m pip download --no-deps --only-binary=:all: -d .whl array-api-compat==1.16.0
#   device: bash bench/gpu_check.sh        (carry: [".whl"])
set -uo pipefail
OUT=${OUT:-/tmp/nnopt-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
exec > >(tee "$OUT/gpu_check.log") 2>&1
started=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - started )) s)"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 --version

step "install (offline: carried wheels, then nnopt itself)"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --find-links .whl .whl/*.whl || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
python3 - <<'PY' || exit 1
import cupy, numba, nnopt, nnopt.kernels
from nnopt.fast import gpu_kernels
print("cupy", cupy.__version__, "numba", numba.__version__, "device",
      cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())
assert gpu_kernels() is not None, "nnopt's CUDA kernels did not load"
PY

step "tests on the cupy backend"
timeout 300 python3 -m pytest -q -p no:cacheprovider --backend cupy --junitxml="$OUT/pytest.xml" \
  -o addopts="" -ra tests || echo "TESTS FAILED (rc $?)"

step "one epoch of python -m nnopt.train --device gpu (CUDA graph)"
timeout 120 python3 -m nnopt.train --device gpu --epochs 1 --target-loss 0 --out /tmp/nnopt-train \
  && cp /tmp/nnopt-train/summary.json "$OUT/train_summary.json"

step "GPU benchmarks"
timeout 240 python3 bench/bench_gpu.py ${BENCH_ARGS:-} --out "$OUT/gpu.json" || echo "BENCH FAILED (rc $?)"

step "done"
sleep 1  # let tee finish the log
