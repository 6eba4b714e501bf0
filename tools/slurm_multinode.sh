#!/usr/bin/env bash
# Multi-node training with SLURM: one `accelerate launch` per node, 8 GPUs each.
#   sbatch --nodes=4 tools/slurm_multinode.sh --config configs/coca-base.yaml train.steps=100000
#   ACCELERATE_CONFIG=configs/accelerate/fsdp-8gpu.yaml sbatch --nodes=4 tools/slurm_multinode.sh --config ...
# (without ACCELERATE_CONFIG: DDP). Every node must see the same repository, data and run.dir (a shared
# filesystem). After a preemption, submit again with --resume auto, on as many nodes as you get.
# The precision is the experiment's train.precision; the node count, processes and rendezvous come from here.
#SBATCH --job-name=vlpretrain
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --output=slurm-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))
if [ -n "${ACCELERATE_CONFIG:-}" ]; then
  MODE=(--config_file "$ACCELERATE_CONFIG")
else
  MODE=(--multi_gpu --mixed_precision no --dynamo_backend no)
fi

# srun starts this once per node; SLURM_NODEID (set on each node) is the machine rank. The training
# arguments pass through as they were given (quoted YAML values included).
srun bash -c 'exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' bash \
  "${MODE[@]}" --num_machines "$SLURM_NNODES" --num_processes "$NUM_PROCESSES" \
  --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" --rdzv_backend static --same_network \
  -m vlpretrain.train "$@"
