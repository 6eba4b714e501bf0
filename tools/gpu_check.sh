#!/usr/bin/env bash
# The one script for a borrowed GPU (~8 minutes): installs the package (and flash-attn if a wheel is
# at hand), then runs tools/gpu_check.py, which writes its figures as JSON to ${OUT:-.}/gpu_check.json.
# Run it only on a GPU machine, never from tests or CI.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || { echo "no GPU"; exit 1; }
python -m pip install -q -e ".[dev]" 2>&1 | tail -2
python -m pip install -q flash-attn --no-build-isolation 2>&1 | tail -1 || echo "flash-attn unavailable; its rows are skipped"
timeout 480 python tools/gpu_check.py "$OUT/gpu_check.json"
# the real trainer on the GPU (data pipeline, loop, logging): one JSON line of figures
BENCH="--config configs/coca-base.yaml data.synthesize=4000 data.num_workers=8 train.steps=40 train.batch_size=128 train.precision=bf16"
timeout 240 python tools/bench.py $BENCH > "$OUT/bench_gpu.json" || echo "bench.py failed"
# two or more GPUs: the same under FSDP (2 processes), world size taken from the figures
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  timeout 180 accelerate launch --config_file configs/accelerate/fsdp-8gpu.yaml --num_processes 2 tools/bench.py \
    $BENCH > "$OUT/bench_fsdp2.json" || echo "FSDP bench failed"
fi
