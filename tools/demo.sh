#!/usr/bin/env bash
# `make demo`: the main job end to end on the built-in synthetic scene (SCENE=dir runs it on a real scene).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
RUN=${RUN_DIR:-runs/demo-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RUN"
echo "[demo] run folder: $RUN"
t0=$(date +%s)
"$BIN/papermill" --log-output --no-progress-bar -k python3 nbs/pipelines/00_synthetic_scene.ipynb "$RUN/00_synthetic_scene.ipynb" \
  -p run_dir "$RUN" -p views 10 -p height 128 -p width 160 >"$RUN/papermill.log" 2>&1 \
  || { echo "[demo] stage 00_synthetic_scene failed; see $RUN/papermill.log and $RUN/00_synthetic_scene.ipynb" >&2; exit 1; }
echo "[demo] done in $(( $(date +%s) - t0 )) s: $RUN/fig_scene.png, $RUN/metrics.json"
cat "$RUN/metrics.json"
