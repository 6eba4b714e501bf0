#!/usr/bin/env bash
# The one script for a borrowed GPU (~8 minutes): installs the package (and flash-attn if a wheel is
# at hand), then runs tools/gpu_check.py, which writes its figures as JSON to ${OUT:-.}/gpu_check.json.
# Run it only on a GPU machine, never from tests or CI.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || { echo "no GPU"; exit 1; }
python -m pip install -q -e . 2>&1 | tail -2
python -m pip install -q flash-attn --no-build-isolation 2>&1 | tail -1 || echo "flash-attn unavailable; its rows are skipped"
timeout 480 python tools/gpu_check.py "$OUT/gpu_check.json"
