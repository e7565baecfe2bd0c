#!/usr/bin/env bash
# Per-kernel profile of the captured training step (bench/profile_gpu.py), on a GPU machine
# with Nsight Compute: one process per configuration, then the table. About a minute.
#   device: bash bench/profile_gpu.sh [CONFIGS...]   (carry: [".whl"]; CONFIGS like 64:bn)
# Exit status: 0 every configuration profiled; 2 no ncu here (nothing profiled; $NCU names
# it where it is not on PATH); 3 ncu failed for a configuration (the others are still
# summarized); 4 a configuration with no kernel profiled (bench/profile_gpu.py --summarize).
set -uo pipefail
OUT=${OUT:-/tmp/nnopt-profile}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
NCU=${NCU:-$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}
echo "ncu: ${NCU:-not found}"
[ -n "$NCU" ] || { echo "PROFILE SKIPPED: no ncu (Nsight Compute) here, nothing profiled"; exit 2; }
PROF=$(mktemp -d /tmp/nnopt-profile-csv.XXXXXX)  # this call's configurations alone
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --find-links .whl .whl/*.whl || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || {
  ln -sfn ../kernels nnopt/kernels; export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
configs=("$@")
(( ${#configs[@]} )) || configs=(64:bn 64:plain 1024:bn 1024:plain 8192:bn 8192:plain)
failed=()
for config in "${configs[@]}"; do
  batch=${config%%:*} kind=${config##*:}
  echo "== $batch $kind"
  # the replay's wall time in a process of its own: under ncu every CUDA call is
  # intercepted (a replay took 2,432 us there against 114 us without, batch 64 with BN)
  meta="$PROF/b${batch}_$kind.meta.json"
  timeout 60 python3 bench/profile_gpu.py --run "$batch" "$kind" > "$meta" ||
    { echo "timing failed for $config: the replay time below is the one under ncu"; rm -f "$meta"; }
  timeout 120 "$NCU" --profile-from-start off --graph-profiling node --clock-control none \
    --metrics gpu__time_duration.sum --csv --log-file "$PROF/b${batch}_$kind.csv" \
    python3 bench/profile_gpu.py --run "$batch" "$kind" > "$PROF/b${batch}_$kind.ncu.log" \
    || { echo "ncu failed for $config"; tail -5 "$PROF/b${batch}_$kind.csv"; failed+=("$config"); }
  [ -s "$meta" ] || cp "$PROF/b${batch}_$kind.ncu.log" "$meta"
done
python3 bench/profile_gpu.py --summarize "$PROF" --out "$OUT/profile.json"
rc=$?
if (( ${#failed[@]} )); then
  echo "PROFILE INCOMPLETE: ncu failed for ${failed[*]} (rc 3)"
  exit 3
fi
exit $rc
