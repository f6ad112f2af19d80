#!/usr/bin/env bash
# The CPU recipe behind the shipped mri-cardiac bundle (no GPU was lent): a small auto-planned 2D DynUNet
# (patch 128x128, filters 16..256, batch 10), trained in two wall-clock stages on the same patient split,
# then evaluated on the held-out patients, exported and packaged.
#   stage 1: STAGE1_MINUTES (70) from scratch, AdamW lr 2e-3, poly schedule over the budget
#   stage 2: STAGE2_MINUTES (80) fine-tuning stage 1's final weights (--init-weights), lr 1e-3, fresh schedule
# Wall-clock budgets make the iteration count depend on the machine: the shipped bundle's manifest records
# what its run reached. On a CUDA GPU use bench/train_cardiac_gpu.sh instead (larger plan, minutes).
#
# Usage: bench/train_cardiac_cpu.sh [OUT]
#   DATA=../shared/data/cardiac/acdc  THREADS=2  STAGE1_MINUTES=70  STAGE2_MINUTES=80  VERSION=cpu-YYYYMMDD
#   PY=.venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/cardiac/acdc}
OUT=${1:-bench/out/cardiac_cpu}
THREADS=${THREADS:-2}
VERSION=${VERSION:-cpu-$(date +%Y%m%d)}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
mkdir -p "$OUT"
TRAIN=(--device cpu --threads "$THREADS" --val-mode whole --val-overlap 0.25 --log-every 20)

stamp "plan"
"$PY" -m trainer.cli plan "$DATA" --out "$OUT" --patch-size 128,128 --base-filters 16 --max-filters 256 \
  --batch-size 10
stamp "train, stage 1 (${STAGE1_MINUTES:-70} min)"
"$PY" -m trainer.cli train "$DATA" --plan "$OUT/plan.json" --out "$OUT/stage1" "${TRAIN[@]}" \
  --time-limit-minutes "${STAGE1_MINUTES:-70}" --lr 2e-3 --val-every 150
stamp "train, stage 2 (${STAGE2_MINUTES:-80} min, from stage 1's weights)"
"$PY" -m trainer.cli train "$DATA" --plan "$OUT/plan.json" --out "$OUT/stage2" "${TRAIN[@]}" \
  --init-weights "$OUT/stage1/checkpoint_final.pt" --time-limit-minutes "${STAGE2_MINUTES:-80}" --lr 1e-3 \
  --val-every 500
CK="$OUT/stage2/checkpoint_final.pt"
stamp "evaluate (held-out patients, sliding window, overlap 0.5, raw and largest component)"
"$PY" -m trainer.cli evaluate "$DATA" --checkpoint "$CK" --out "$OUT/eval" --mode sliding --overlap 0.5 \
  --postprocess largest --eval-group-regex 'frame\d+' --threads "$THREADS" --worst 4
stamp "export (TorchScript, ONNX fp32/fp16/int8) with measured Dice per variant"
"$PY" -m trainer.cli export "$DATA" --checkpoint "$CK" --out "$OUT/export" --eval-variants --mode whole \
  --max-eval-cases 14 --threads "$THREADS"
stamp "package"
"$PY" -m trainer.cli package --checkpoint "$CK" --onnx "$OUT/export/model.onnx" --eval-dir "$OUT/eval" \
  --models-root "$OUT/models" --name mri-cardiac --version "$VERSION" \
  --description "Right-ventricular cavity, LV myocardium and LV cavity on cine short-axis MRI: 2D DynUNet trained by segnode-train on ACDC (research use only)"
stamp "done: $OUT (eval/summary.json, export/export_report.json, models/)"
