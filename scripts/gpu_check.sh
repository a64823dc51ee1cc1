#!/usr/bin/env bash
# GPU checks (issues 4 and 6): install the CUDA extras, then benchmark on this GPU.
# Usage: bash scripts/gpu_check.sh [OUT.md]   (default docs/gpu-check.md)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[onnx,families]'
# onnxruntime-gpu gives the CUDA / TensorRT execution providers; TensorRT itself is optional
python3 -m pip install -q onnxruntime-gpu || echo "onnxruntime-gpu not installed: CPU provider only"
PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out "${1:-docs/gpu-check.md}"
PYTHONUNBUFFERED=1 python3 scripts/gpu_families.py --out "${2:-docs/gpu-families.md}"
