#!/usr/bin/env bash
# The one script a session with a GPU runs (from the repository root on the GPU machine,
# .whl/ carried). Budget: under 5 minutes on an H100/H200, steps in order of importance,
# each with its own time limit so a hang cannot eat the rest:
#   1. machine + install: carried wheels (.whl/: array-api-compat, absent there), nnopt -e  ~20 s
#   2. tests/test_gpu.py on the cupy backend (kernels, cuBLAS in the graph, graph vs eager) <= 110 s
#   3. bench/bench_gpu.py --check, a process per section: BN at every shape (<= 25 s), the
#      captured step vs torch eager and torch's CUDA graph at batch 64/1024/8192 (and
#      nnopt's choices undone, one by one; <= 70 s), optimizer bandwidth (1e7, 1e8; <= 25 s)
#   4. one epoch of python -m nnopt.train --device gpu                                   <= 40 s
#   5. bench/sanitize_gpu.py under compute-sanitizer: memcheck, racecheck, synccheck      <= 60 s
#   6. bench/profile_gpu.sh 64:bn: each kernel of the captured step at batch 64, with BN  <= 60 s
#   7. the rest of the test suite on the cupy backend, with what time is left            <= 60 s
# Writes to $OUT: gpu_check.log, pytest_gpu.xml, pytest_rest.xml, gpu.json, gpu.png,
# train_summary.json, sanitizer_<tool>.log, profile.json, and check.json (each step's exit
# status and seconds; rc -1: skipped).
# Commit $OUT/gpu.json as bench/results/gpu.json (it names the device).
#
#   here:   python3 -m pip download --no-deps --only-binary=:all: -d .whl array-api-compat
#   device: bash bench/gpu_check.sh        (carry: [".whl"])
set -uo pipefail
OUT=${OUT:-/tmp/nnopt-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
exec > >(tee "$OUT/gpu_check.log") 2>&1
started=$(date +%s)
BUDGET=${BUDGET:-285}
elapsed() { echo $(( $(date +%s) - started )); }
step() { echo; echo "== $* ($(elapsed) s)"; }
STATUS=()
record() { STATUS+=("\"$1\": {\"rc\": $2, \"at_s\": $(elapsed)}"); }
# seconds a step may take: its own limit, or what is left of the budget (at least 1:
# `timeout 0` would mean no limit at all)
left() { local l=$(( BUDGET - $(elapsed) )); (( l > $1 )) && l=$1; (( l < 1 )) && l=1; echo "$l"; }

cat <<'PLAN'
plan: 1 install (carried wheels, nnopt -e) | 2 tests/test_gpu.py --backend cupy (<=110 s)
      3 bench_gpu.py --check, a process per section: BN fwd+bwd 64x16..4096x4096 vs torch
        (and 4-byte loads; <=25 s) | captured step b64/1024/8192 +-BN vs torch eager and
        torch CUDA graph (and each of nnopt's choices undone; <=70 s) | optimizers at
        1e7/1e8 vs copy bandwidth and torch fused Adam (<=25 s) | 4 one GPU epoch (<=40 s)
      5 every kernel under compute-sanitizer: memcheck, racecheck, synccheck (<=60 s)
      6 ncu profile of the captured step, batch 64 with BN (<=60 s)
      7 rest of the suite --backend cupy (time left) | total under 5 minutes
PLAN

step "1. machine and install"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 --version
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --find-links .whl .whl/*.whl || exit 1
fi
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
  # e.g. a setuptools too old for pyproject's license field: run from the checkout instead
  echo "note: pip install -e . failed; using the checkout through PYTHONPATH"
  ln -sfn ../kernels nnopt/kernels
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 - <<'PY' || exit 1
import cupy, nnopt, nnopt.kernels
from nnopt.fast import gpu_kernels
print("cupy", cupy.__version__, "device", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())
gpu = gpu_kernels()
assert gpu is not None, "nnopt's CUDA kernels did not load"
gpu.cublas_handle()
print("GEMM route inside captured graphs:", gpu.HANDLES.route(cupy.cuda.Device().id))
PY
record install 0

step "2. tests/test_gpu.py on the cupy backend"
# (its one-epoch training test is step 4's job)
timeout "$(left 110)" python3 -m pytest -q -p no:cacheprovider --backend cupy -o addopts="" -ra \
  --durations=10 --junitxml="$OUT/pytest_gpu.xml" -k "not one_epoch" tests/test_gpu.py
rc=$?; record test_gpu $rc; (( rc )) && echo "GPU TESTS FAILED (rc $rc)"

step "3. GPU benchmarks (bench_gpu.py --check), a process per section"
# a fault in one section (a CUDA error poisons its process's context) costs only that
# section; each adds its numbers to the same gpu.json
for section in bn:25 train:70 optim:25; do
  name=${section%%:*}
  timeout "$(left "${section##*:}")" python3 bench/bench_gpu.py --check --only "$name" \
    --out "$OUT/gpu.json"
  rc=$?; record "bench_$name" $rc; (( rc )) && echo "BENCH $name FAILED (rc $rc)"
done

step "4. one epoch of python -m nnopt.train --device gpu (CUDA graph)"
timeout "$(left 40)" python3 -m nnopt.train --device gpu --epochs 1 --target-loss 0 \
  --out /tmp/nnopt-train --overwrite && cp /tmp/nnopt-train/summary.json "$OUT/train_summary.json"
rc=$?; record train $rc

step "5. every kernel under compute-sanitizer (<= 60 s)"
# out-of-bounds and misaligned accesses, shared-memory races (what the emulated device's
# thread orders cannot show: a warp's lockstep), barriers not all threads reach.
# rc 9: the tool found something (its log says what); skipped without compute-sanitizer.
SANITIZER=$(command -v compute-sanitizer ||
            ls /usr/local/cuda*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -1)
echo "compute-sanitizer: ${SANITIZER:-not found}"
for tool in memcheck:25 racecheck:25 synccheck:10; do
  name=${tool%%:*}
  if [ -n "$SANITIZER" ] && (( $(left "${tool##*:}") > 5 )); then
    timeout "$(left "${tool##*:}")" "$SANITIZER" --tool "$name" --error-exitcode 9 \
      --log-file "$OUT/sanitizer_$name.log" python3 bench/sanitize_gpu.py > /dev/null
    rc=$?; record "sanitizer_$name" $rc
    (( rc )) && { echo "SANITIZER $name: rc $rc"; tail -20 "$OUT/sanitizer_$name.log"; }
  else
    record "sanitizer_$name" -1
  fi
done

step "6. where the captured step's time goes: Nsight Compute, batch 64 with BN (<= 60 s)"
# issue 14's target (60 us per step); its per-kernel table lets a session without a GPU
# work on the right nodes. Skipped without ncu.
if (( $(left 60) > 20 )); then  # (a timing process, then the one ncu runs)
  OUT="$OUT" timeout "$(left 60)" bash bench/profile_gpu.sh 64:bn
  rc=$?; record profile $rc
else
  record profile -1
fi

step "7. the rest of the suite on the cupy backend (time left: $(left 60) s)"
if (( $(left 60) > 15 )); then
  timeout "$(left 60)" python3 -m pytest -q -p no:cacheprovider --backend cupy -o addopts="" \
    -ra --junitxml="$OUT/pytest_rest.xml" tests \
    --ignore tests/test_gpu.py
  rc=$?; record test_rest $rc
else
  record test_rest -1
fi

step "done"
( IFS=,; echo "{\"total_s\": $(elapsed), ${STATUS[*]}}" ) > "$OUT/check.json"
cat "$OUT/check.json"
sleep 1  # let tee finish the log
