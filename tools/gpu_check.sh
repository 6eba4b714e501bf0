#!/usr/bin/env bash
# The one script for a borrowed GPU (at most ~9 minutes, one run call inside the 15-minute budget):
# tools/gpu_check.py's figures as JSON in ${OUT:-.}/gpu_check.json, then the real trainer's figures (bench_gpu.json, and bench_fsdp2.json
# with two GPUs or more).
#
# The lent GPU machine reaches no network: its python3 has torch, transformers, timm, accelerate,
# peft, sentencepiece and torchvision, but not omegaconf, webdataset or open_clip_torch. So first,
# HERE (the package registry is reachable):
#     bash tools/gpu_check.sh --prepare        # pure-Python wheels into .gpu_wheels/ (git-ignored)
# then on the device, carrying that folder, in one call (~9 minutes with the start; the budget is 15):
#     run(command="set -o pipefail; bash tools/gpu_check.sh 2>&1 | tee $OUT/gpu_log.txt", carry=[".gpu_wheels"], timeout_s=580)
# (H200: gpu_check.py took ~355 s on 2026-11-27 and ~370 s on 2026-11-28, the machine 30-60 s to start;
# limits 400 s + 180 s for the trainer bench. Then, with the ~6 minutes left, a second call of
# `bash tools/gpu_check.sh --trainer` (timeout_s=330): the trainer bench and tools/bench_data.py alone;
# on 2026-11-28 the trainer bench took ~135 s there)
# The package is not installed there: the tools put the repo root on sys.path (PYTHONPATH below).
# Never from tests or CI (the test suite runs tools/gpu_check.py --smoke on the CPU instead).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
WHEELS=(omegaconf webdataset braceexpand open_clip_torch ftfy wcwidth)
if [ "${1:-}" = "--prepare" ]; then
  rm -rf .gpu_wheels && mkdir -p .gpu_wheels
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu_wheels "${WHEELS[@]}" || exit 1
  ls .gpu_wheels
  exit 0
fi
OUT=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || { echo "no GPU"; exit 1; }
if [ -d .gpu_wheels ]; then  # offline: only what the machine lacks, from the carried wheels
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_site .gpu_wheels/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/gpu_site
else
  "$PY" -m pip install -q -e ".[dev]" 2>&1 | tail -2
  "$PY" -m pip install -q flash-attn --no-build-isolation 2>&1 | tail -1 || echo "flash-attn unavailable; its rows are skipped"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import vlpretrain, omegaconf, webdataset, open_clip, torch; print('torch', torch.__version__)" || exit 1
MODE=${1:-}  # --trainer: the trainer and data-pipeline benchmarks alone (a second, ~4-minute call)
[ "$MODE" = "--trainer" ] || PYTHONUNBUFFERED=1 timeout 400 "$PY" tools/gpu_check.py "$OUT/gpu_check.json"
# the real trainer on the GPU under torch.compile with CUDA graphs (data pipeline, loop, logging; captions
# padded to a multiple of 8 of each batch's longest: one CUDA graph per such length): one JSON line of
# figures. Logged every 5 steps (the loop reads the device on the host at log steps only); resampled data
# (no epoch restarts of 12 workers). gpu_check.json's train_base_bf16_compiled/_cudagraphs are the same
# model without the trainer, with and without CUDA graphs.
BENCH="--config configs/coca-base.yaml --log-every 5 data.synthesize=1024 data.mode=resampled data.num_workers=12 data.pad_multiple=8 train.steps=40 train.batch_size=128 train.precision=bf16 train.compile=true train.compile_mode=reduce-overhead"
TORCH_LOGS=cudagraphs timeout 180 "$PY" tools/bench.py $BENCH > "$OUT/bench_gpu.json" || echo "bench.py failed"
# the data pipeline alone on this machine's CPUs, ours and OpenCLIP's: with the trainer's 12 workers at the
# default SCHED_IDLE priority and at normal priority, and with one worker (the per-worker rate). Was the
# trainer above waiting on the machine's CPUs, on the workers' priority, or on our pipeline?
if [ "$MODE" = "--trainer" ]; then
  for RUN in "12 idle" "12 normal" "1 idle"; do
    set -- $RUN
    timeout 60 "$PY" tools/bench_data.py --samples $(($1 * 512)) --workers $1 --priority $2 --batch-size 128 \
      --rounds 1 > "$OUT/bench_data_w$1_$2.json" || echo "bench_data.py ($RUN) failed"
  done
fi
# two or more GPUs: the same under FSDP (2 processes), world size taken from the figures
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  timeout 180 "$PY" -m accelerate.commands.launch --config_file configs/accelerate/fsdp-8gpu.yaml --num_processes 2 \
    tools/bench.py $BENCH > "$OUT/bench_fsdp2.json" || echo "FSDP bench failed"
fi
