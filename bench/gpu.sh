#!/usr/bin/env bash
# GPU inference benchmark, one CUDA GPU, under 5 minutes:
#   bash bench/gpu.sh [more bench/inference.py options, e.g. --variants ours-torch-fp16]
#
# The same comparison as `python bench/inference.py` on CPU (MONAI's sliding_window_inference, or a plain
# torch sliding-window loop where MONAI is absent, against our engine, same model, volume, patch, overlap
# and batch), on the GPU, plus: baseline under autocast fp16; ours with torch eager fp32, autocast fp16
# and bf16, CUDA graphs (fp16), torch.compile (fp16), torch.compile reduce-overhead (fp16); onnxruntime's
# CUDA EP and TensorRT (fp16) when installed, else reported as skipped with the reason.
#
# Needs python3 with torch (CUDA build), numpy and onnxruntime (the CPU build does: it checks the ONNX
# export); onnxscript for the dynamo exporter (else the TorchScript exporter is used); MONAI and tensorrt
# are optional. Env: PYTHON (default python3), OUT (result folder, default bench/out), LIMIT_S (hard
# limit, default 290 s; the benchmark stops starting new work at LIMIT_S - 90 s).
# Results: a table on stdout and $OUT/inference-cuda.json. Volume 1x256x320x320, patch 128^3 (48 windows,
# 24 full batches: no partial batch to recompile or re-capture), variants set up and timed one after the
# other (best of 5), the compiled ones last.
# Without a GPU, the same Python path (variant set, no-MONAI baseline, reasons for what cannot run) is
# checked with: python bench/inference.py --device cpu --quick --set gpu --schedule sequential --no-monai
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT:-bench/out}"
LIMIT_S="${LIMIT_S:-290}"
BUDGET_S=$((LIMIT_S - 90))

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi not found"
"$PYTHON" - <<'PY'
import importlib
import sys

try:
    import torch
except ImportError as exc:
    print(f"{sys.executable} cannot import torch ({exc}): set PYTHON to an interpreter with CUDA torch")
    sys.exit(2)

print(f"python {sys.version.split()[0]}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
      f"GPU available: {torch.cuda.is_available()}")
for name in ("numpy", "onnxruntime", "onnx", "onnxscript", "monai", "tensorrt"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001 - report whatever stops the import
        print(f"  {name}: not available ({type(exc).__name__})")
if not torch.cuda.is_available():
    print("no CUDA GPU visible: this benchmark is for a GPU machine (CPU: python bench/inference.py)")
    sys.exit(2)
PY

exec timeout --signal=INT --kill-after=20 "$LIMIT_S" "$PYTHON" bench/inference.py --device cuda \
    --volume 256,320,320 --patch 128,128,128 --overlap 0.5 --batch 2 --repeats 5 \
    --budget-s "$BUDGET_S" --out "$OUT_DIR" "$@"
