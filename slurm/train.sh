#!/bin/bash
# CLoVe training under SLURM: one task per GPU, srun starts them all, rank/world/master come from SLURM.
#
#   sbatch --nodes 1 --ntasks-per-node 8 --gpus-per-node 8 slurm/train.sh configs/clove_vit_b32.yaml \
#       --set data.train_shards='/data/laion-coco/{00000..59999}.tar'
#   sbatch --ntasks-per-node 2 --cpus-per-task 1 --gpus-per-node 0 slurm/train.sh configs/debug.yaml \
#       --set run.device=cpu                                                    # CPU-only debug (gloo)
#
# Everything after the config is passed to `clove_dist.train` (e.g. --set optim.lr=1e-5); quote shard patterns so
# the shell does not expand their braces. Resubmitting the same command resumes from the run directory's latest
# complete checkpoint, on any number of tasks.
#
# Preemption: SLURM sends SIGUSR1 to this script 300 s before the time limit (--signal=B:USR1@SECONDS to change the
# lead time: enough for one step and one checkpoint write). It is forwarded to the training tasks, which agree at the
# next step and save a checkpoint; then rank 0 requeues the job (scontrol requeue), which resumes at that step. The
# log of every restart is appended to the same file. To stop a job with a checkpoint and no requeue:
# `scancel --batch --signal=TERM JOBID` (this script passes it on as SIGUSR2: srun turns a SIGTERM into SIGKILL).
#
# Set CLOVE_PYTHON to choose the interpreter and CLOVE_MASTER_PORT the rendezvous port (default: 20000 + job id %
# 20000).
#SBATCH --job-name=clove
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --output=clove-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
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

echo "clove: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}), $SLURM_NTASKS tasks on $SLURM_JOB_NUM_NODES" \
     "node(s), master $MASTER_ADDR:$MASTER_PORT"

# srun runs in the background so that this shell can take signals while training runs (bash runs a trap only
# between commands: a foreground srun would hold it until the end).
srun_pid=""
forward() {  # $1: signal received, $2: signal the tasks get (srun passes USR1/USR2 on; it answers TERM with KILL)
  echo "clove: got SIG$1, telling the training tasks to checkpoint and stop"
  [ -n "$srun_pid" ] && kill -s "$2" "$srun_pid" 2>/dev/null || true
}
trap 'forward USR1 USR1' USR1
trap 'forward TERM USR2' TERM

srun --kill-on-bad-exit=1 "$PYTHON" -m clove_dist.train --config "$CONFIG" "$@" &
srun_pid=$!
status=0
while :; do
  wait "$srun_pid" && status=0 || status=$?
  kill -0 "$srun_pid" 2>/dev/null || break  # wait returned because of a signal: srun is still running
done
exit "$status"
