#!/usr/bin/env bash
# GPU check (issue 4): install the CUDA extras, then benchmark the engines on this GPU.
# Usage: bash scripts/gpu_check.sh [OUT.md]   (default docs/gpu-check.md)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[onnx]' diffusers
# onnxruntime-gpu gives the CUDA / TensorRT execution providers; TensorRT itself is optional
python3 -m pip install -q onnxruntime-gpu || echo "onnxruntime-gpu not installed: CPU provider only"
PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out "${1:-docs/gpu-check.md}"
