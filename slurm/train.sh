#!/bin/bash
# CLoVe training under SLURM: one task per GPU, srun starts them all, rank/world/master come from SLURM.
#
#   sbatch --nodes 1 --ntasks-per-node 8 --gpus-per-node 8 slurm/train.sh configs/clove_vit_b32.yaml \
#       --set data.train_shards='/data/laion-coco/{00000..59999}.tar'
#   sbatch --ntasks 2 --cpus-per-task 1 slurm/train.sh configs/debug.yaml      # CPU-only debug (gloo)
#
# Everything after the config is passed to `clove_dist.train` (e.g. --set optim.lr=1e-5). Resubmitting the same
# command resumes from the run directory's latest checkpoint. Set CLOVE_PYTHON to choose the interpreter and
# CLOVE_MASTER_PORT to choose the rendezvous port (default: 20000 + job id % 20000).
#SBATCH --job-name=clove
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --output=clove-%j.out
#SBATCH --requeue
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: sbatch [sbatch options] slurm/train.sh CONFIG [--set key=value ...]" >&2
  exit 2
fi
CONFIG=$1
shift
[ -f "$CONFIG" ] || { echo "error: config file not found: $CONFIG" >&2; exit 2; }

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# A one-node allocation whose node name does not resolve (test clusters) still works over loopback.
if ! getent hosts "$MASTER_ADDR" >/dev/null && [ "${SLURM_JOB_NUM_NODES:-1}" = 1 ]; then
  MASTER_ADDR=127.0.0.1
fi
export MASTER_ADDR
# The submitting shell's launcher variables (RANK, MASTER_PORT, ... of a torchrun or debug session) must not leak
# into the tasks: each task's rank comes from SLURM_PROCID, the port from the job id (CLOVE_MASTER_PORT to choose).
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE TORCHELASTIC_RUN_ID
export MASTER_PORT=${CLOVE_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
PYTHON=${CLOVE_PYTHON:-python3}

echo "clove: job $SLURM_JOB_ID, $SLURM_NTASKS tasks on $SLURM_JOB_NUM_NODES node(s), master $MASTER_ADDR:$MASTER_PORT"
exec srun --kill-on-bad-exit=1 "$PYTHON" -m clove_dist.train --config "$CONFIG" "$@"
