#!/usr/bin/env bash
# Multi-node training with SLURM: one `accelerate launch` per node, 8 GPUs each.
#   sbatch --nodes=4 tools/slurm_multinode.sh --config configs/coca-base.yaml train.steps=100000
# Every node must see the same repository, data and run.dir (a shared filesystem).
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

# srun starts this once per node; SLURM_NODEID is the machine rank.
srun bash -c "accelerate launch \
  --multi_gpu --mixed_precision bf16 \
  --num_machines $SLURM_NNODES --num_processes $NUM_PROCESSES \
  --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_ADDR --main_process_port $MAIN_PORT \
  --rdzv_backend static --same_network \
  -m vlpretrain.train $*"
