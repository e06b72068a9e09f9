#!/usr/bin/env bash
# `make demo`: the whole self-supervised pipeline end to end through papermill, on the CPU:
#   scene → unsupervised teacher → pseudo labels (check, fusion, SPSR / KD) → students → fused clouds → evaluation
# and a report.md with each stage's metrics that need no ground truth (held-out-view photometric error, cross-view
# agreement) and, on the synthetic scene, its depth error and point-cloud accuracy/completeness against ground truth.
# `make demo SCENE=dir` runs the same stages on a scene folder in the DTU test layout (for example one made by
# `mvsnb data import strecha ../shared/realdata/strecha_epfl/fountain-P11 --out /tmp/fountain --downscale 16`);
# without gt/ the report gives only the metrics that need none.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" MPLBACKEND=Agg OMP_WAIT_POLICY=PASSIVE
SCENE=${1:-}
RUN=${RUN_DIR:-runs/demo-$(date +%Y%m%d-%H%M%S)}
# The settings measured in benchmarks/selftrain_cpu.py (teacher: benchmarks/teacher_cpu.py): a 10-view scene rendered at
# 128x160, networks at 64x80, the evaluation-fusion check for both kinds of labels.
STEPS=${DEMO_STEPS:-300}       # teacher and fine-tuned student steps; the from-scratch KD student gets twice as many
H=${DEMO_HEIGHT:-64}; W=${DEMO_WIDTH:-80}; V=${DEMO_VIEWS:-10}
if [ -n "$SCENE" ]; then
  [ -d "$SCENE/cams" ] || { echo "[demo] $SCENE is not a scene folder in the DTU test layout (no cams/)" >&2; exit 2; }
  # a real scene keeps its aspect ratio: width = height x image aspect, a multiple of 16 (unless DEMO_WIDTH is given)
  [ -n "${DEMO_WIDTH:-}" ] || W=$(python - "$SCENE" "$H" <<'PY'
import sys
from pathlib import Path
from PIL import Image
p = sorted(q for q in (Path(sys.argv[1]) / "images").iterdir() if q.suffix.lower() in (".png", ".jpg", ".jpeg"))[0]
w, h = Image.open(p).size
print(max(16, round(int(sys.argv[2]) * w / h / 16) * 16))
PY
) || { echo "[demo] cannot read an image of $SCENE/images" >&2; exit 2; }
fi
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
  SC="$RUN/00_scene/scene"; LAYOUT=synthetic; heldout=(-p heldout_scene_dir "$RUN/01_heldout_scene/scene")
else
  SC="$SCENE"; LAYOUT=dtu_test; heldout=()
  echo "[demo] scene $SC at ${H}x${W}"
fi
# the same stages for both: the synthetic scene's ground truth is read by the evaluation only
stage 10_teacher 10_train_teacher -p data_root "$SC" -p data_layout "$LAYOUT" -p height "$H" -p width "$W" "${teach[@]}"
stage 20_labels 20_pseudo_labels -p teacher_run "$RUN/10_teacher" -p scene_dir "$SC" -p labels both \
  -p spsr_check eval_fusion -p kd_check eval_fusion
# the control: the teacher trained 2xSTEPS more steps with its own loss, so "student beats teacher" is not just "more steps"
CTRL="${LOOP%\}}, \"init_checkpoint\": \"$RUN/10_teacher/checkpoints/last.pt\"}"
stage 15_control 10_train_teacher -p data_root "$SC" -p data_layout "$LAYOUT" -p height "$H" -p width "$W" \
  -p model cascade -p loss khot -p steps $((2 * STEPS)) -p lr 0.001 -p num_views 3 -p train_overrides "$CTRL"
# students: the papers' label losses plus the teacher's unsupervised loss (mvsnb's hybrid extension, weights tuned on
# the training scene in benchmarks/selftrain_cpu.py) so pixels no label covers do not drift
stage 30_student_spsr 30_self_train -p labels_run "$RUN/20_labels" -p labels spsr -p loss pseudo_l1 \
  -p init teacher -p steps "$STEPS" -p lr 0.001 -p train_overrides "$LOOP" \
  -p unsup_weight 0.3 -p unsup_loss khot -p unsup_pixels unlabelled
stage 31_student_kd 30_self_train -p labels_run "$RUN/20_labels" -p labels kd -p loss kd_paper \
  -p init scratch -p steps $((2 * STEPS)) -p lr 0.003 -p train_overrides "$LOOP" \
  -p unsup_weight 1.0 -p unsup_loss khot -p unsup_pixels all
for m in 10_teacher 15_control 30_student_spsr 31_student_kd; do
  stage "50_eval_${m#*_}" 50_evaluate -p checkpoint_run "$RUN/$m" -p scene_dir "$SC" ${heldout[@]+"${heldout[@]}"}
done
python tools/demo_report.py "$RUN" --seconds $(( $(date +%s) - t0 ))
echo "[demo] done in $(( $(date +%s) - t0 )) s: $RUN/report.md"
