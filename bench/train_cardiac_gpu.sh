#!/usr/bin/env bash
# Train, evaluate and export the mri-cardiac model on one CUDA GPU in under 10 minutes (AMP on CUDA):
#   plan (automatic nnU-Net-style 2D plan for ACDC) -> train (wall-clock budget, poly schedule over it)
#   -> evaluate on the held-out patients (Dice, HD95 mm) -> export (TorchScript, ONNX fp32/fp16/int8,
#   TensorRT when installed) -> package a bundle under $OUT/models.
#
# Usage: bench/train_cardiac_gpu.sh [OUT]
#   DATA=../shared/data/cardiac/acdc  DEVICE=cuda|cpu  TRAIN_MINUTES=6  BATCH=32  PY=.venv/bin/python
#   TINY=1: a CPU smoke run (8 cases, 64x64 patches, 10 iterations) that checks every step of the script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/cardiac/acdc}
OUT=${1:-bench/out/cardiac_gpu}
DEVICE=${DEVICE:-cuda}
TRAIN_MINUTES=${TRAIN_MINUTES:-6}
BATCH=${BATCH:-32}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

if [ "$DEVICE" = cuda ]; then
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: run with DEVICE=cpu (slow) or TINY=1")'
  "$PY" -c 'import torch; print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)'
fi
mkdir -p "$OUT"

if [ "${TINY:-0}" = 1 ]; then
  PLAN=(--max-cases 8 --patch-size 64,64 --base-filters 8 --max-filters 32 --max-levels 4 --batch-size 4)
  TRAIN=(--max-cases 8 --max-iterations 10 --val-every 5 --val-fraction 0.25 --threads 1)
  EVAL=(--max-cases 8)
else
  # automatic plan (2D, 1.5625 mm in-plane, patch ~224x256, DynUNet 32..512); a GPU takes a larger batch
  PLAN=(--batch-size "$BATCH")
  TRAIN=(--time-limit-minutes "$TRAIN_MINUTES" --val-every 400 --lr 3e-3)
  EVAL=()
fi

stamp "plan"
"$PY" -m trainer.cli plan "$DATA" --out "$OUT" "${PLAN[@]}"
stamp "train on $DEVICE"
"$PY" -m trainer.cli train "$DATA" --plan "$OUT/plan.json" --out "$OUT/run" --device "$DEVICE" \
  --val-mode whole --log-every 50 --no-resume "${TRAIN[@]}"
stamp "evaluate (held-out patients, sliding window, overlap 0.5)"
"$PY" -m trainer.cli evaluate "$DATA" "${EVAL[@]}" --checkpoint "$OUT/run/checkpoint_final.pt" \
  --out "$OUT/eval" --device "$DEVICE" --eval-group-regex 'frame\d+'
stamp "export (TorchScript, ONNX fp32/fp16/int8, TensorRT if present) with measured Dice per variant"
"$PY" -m trainer.cli export "$DATA" "${EVAL[@]}" --checkpoint "$OUT/run/checkpoint_final.pt" \
  --out "$OUT/export" --eval-variants --mode sliding --overlap 0.25
stamp "package"
"$PY" -m trainer.cli package --checkpoint "$OUT/run/checkpoint_final.pt" --onnx "$OUT/export/model.onnx" \
  --eval-dir "$OUT/eval" --models-root "$OUT/models" --name mri-cardiac --version "gpu-$(date +%Y%m%d)" \
  --description "RV, LV myocardium and LV cavity on cine short-axis MRI (2D DynUNet, ACDC, GPU run)"
stamp "done: $OUT (eval/summary.json, export/export_report.json, models/)"
