#!/usr/bin/env bash
# `make bench` (`make bench FULL=1` for the full sweep): every benchmark in benchmarks/ in its own process, in
# sequence. Each prints the machine and a table and writes benchmarks/out/<name>.json; benchmarks/summary.py then
# prints one table with every ratio and writes benchmarks/out/bench_all.json (commit a copy per release under
# benchmarks/results/). The default sizes take about 10-15 minutes on 2 busy CPU cores.
#
#   tools/bench.sh [--full] [--device cpu|cuda|auto]     (BENCH_ONLY="warp ply" runs a subset)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
full=""; device=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --full) full=--full ;;
    --device) device="$2"; shift ;;
    *) echo "usage: tools/bench.sh [--full] [--device cpu|cuda|auto]" >&2; exit 2 ;;
  esac
  shift
done
# idle OpenMP threads sleep instead of spinning: on a shared machine spinning threads lose their time slices
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} MPLBACKEND=Agg PYTHONUNBUFFERED=1 PYTHONHASHSEED=0
mkdir -p benchmarks/out
start=$(date +%s)
before=$(uptime)
echo "mvsnb benchmarks ${full:-(default sizes)} on device $device; $before"
failed=()

run() {  # name, then its arguments
  local name=$1; shift
  if [ -n "${BENCH_ONLY:-}" ] && [[ " $BENCH_ONLY " != *" ${name#bench_} "* ]]; then return; fi
  local t0; t0=$(date +%s)
  echo; echo "=================== $name $*"
  if ! "$PY" "benchmarks/$name.py" "$@"; then failed+=("$name"); echo "!! $name failed"; fi
  echo "=================== $name: $(( $(date +%s) - t0 )) s (load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null))"
}

dev=(--device "$device")
run bench_probe $full "${dev[@]}"
run bench_warp $full "${dev[@]}"
run bench_train_step $full "${dev[@]}"
run bench_ply $full "${dev[@]}"
run bench_fusion $full "${dev[@]}"
run bench_spsr $full "${dev[@]}"
run bench_patchmatch $full "${dev[@]}"
run bench_memory $full "${dev[@]}"
# the cross-view check (49 views x 10 sources at 512x640: baseline, eager and compiled in alternating rounds) and
# the DTU-style evaluation (--full adds 4M points)
run bench_crossview $full "${dev[@]}"
run bench_eval $full "${dev[@]}"

wall=$(( $(date +%s) - start ))
"$PY" benchmarks/summary.py --since "$start" --wall "$wall" --load-before "$before" || failed+=(summary)
if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}"; exit 1; fi
