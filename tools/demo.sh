#!/usr/bin/env bash
# `make demo`: the whole self-supervised pipeline end to end through papermill, on the CPU:
#   synthetic scene → unsupervised teacher → pseudo labels (check, fusion, SPSR / KD) → students → evaluation
# and a report.md with each stage's depth error and point-cloud accuracy/completeness against ground truth.
# `make demo SCENE=dir` runs teacher → labels → evaluation on a scene folder in the DTU test layout (for example
# one made by `mvsnb data import`); without ground truth the report gives metrics that need none.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" MPLBACKEND=Agg OMP_WAIT_POLICY=PASSIVE
SCENE=${1:-}
RUN=${RUN_DIR:-runs/demo-$(date +%Y%m%d-%H%M%S)}
# The settings measured in benchmarks/selftrain_cpu.py (teacher: benchmarks/teacher_cpu.py): a 10-view scene rendered at
# 128x160, networks at 64x80, the evaluation-fusion check for both kinds of labels.
STEPS=${DEMO_STEPS:-300}       # teacher and fine-tuned student steps; the from-scratch KD student gets twice as many
H=${DEMO_HEIGHT:-64}; W=${DEMO_WIDTH:-80}; V=${DEMO_VIEWS:-10}
mkdir -p "$RUN"; t0=$(date +%s)
stage() {  # stage NAME NOTEBOOK ARGS...: run one pipeline notebook into $RUN/NAME, with its own log
  local name=$1 nb=$2; shift 2; local s=$(date +%s)
  echo "[demo] $name ..."
  if ! mvsnb run "nbs/pipelines/$nb.ipynb" --run-dir "$RUN/$name" "$@" >"$RUN/$name.log" 2>&1; then
    echo "[demo] stage $name failed: see $RUN/$name.log and $RUN/$name/$nb.ipynb" >&2; tail -3 "$RUN/$name.log" >&2; exit 1
  fi
  echo "[demo] $name done in $(( $(date +%s) - s )) s"
}
LOOP='{"schedule": "cosine", "min_lr_factor": 0.1, "warmup_steps": 0, "val_every": 100, "ckpt_every": 100, "log_every": 25}'
teach=(-p model cascade -p loss khot -p steps "$STEPS" -p lr 0.003 -p num_views 3 -p train_overrides "$LOOP")
echo "[demo] run folder: $RUN"
if [ -z "$SCENE" ]; then
  stage 00_scene 00_synthetic_scene -p views "$V" -p height $((2 * H)) -p width $((2 * W)) -p seed 0
  stage 01_heldout_scene 00_synthetic_scene -p views "$V" -p height $((2 * H)) -p width $((2 * W)) -p seed 1
  SC="$RUN/00_scene/scene"; HO="$RUN/01_heldout_scene/scene"
  stage 10_teacher 10_train_teacher -p data_root "$SC" -p data_layout synthetic -p height "$H" -p width "$W" "${teach[@]}"
  stage 20_labels 20_pseudo_labels -p teacher_run "$RUN/10_teacher" -p scene_dir "$SC" -p labels both \
    -p spsr_check eval_fusion -p kd_check eval_fusion
  stage 30_student_spsr 30_self_train -p labels_run "$RUN/20_labels" -p labels spsr -p loss pseudo_l1 \
    -p init teacher -p steps "$STEPS" -p lr 0.001 -p train_overrides "$LOOP"
  stage 31_student_kd 30_self_train -p labels_run "$RUN/20_labels" -p labels kd -p loss kd_paper \
    -p init scratch -p steps $((2 * STEPS)) -p lr 0.003 -p train_overrides "$LOOP"
  for m in 10_teacher 30_student_spsr 31_student_kd; do
    stage "50_eval_${m#*_}" 50_evaluate -p checkpoint_run "$RUN/$m" -p scene_dir "$SC" -p heldout_scene_dir "$HO"
  done
else
  [ -d "$SCENE/cams" ] || { echo "[demo] $SCENE is not a scene folder in the DTU test layout (no cams/)" >&2; exit 2; }
  stage 10_teacher 10_train_teacher -p data_root "$SCENE" -p data_layout dtu_test -p height "$H" -p width "$W" "${teach[@]}"
  stage 20_labels 20_pseudo_labels -p teacher_run "$RUN/10_teacher" -p scene_dir "$SCENE" -p labels both
fi
python tools/demo_report.py "$RUN" --seconds $(( $(date +%s) - t0 ))
echo "[demo] done in $(( $(date +%s) - t0 )) s: $RUN/report.md"
