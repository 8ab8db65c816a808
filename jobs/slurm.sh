#!/bin/bash
# SLURM batch job: one MPI rank per GPU (or per group of cores on CPU nodes).
# Starts the run, or resumes it when RUN_DIR already holds a run log; requeues itself when
# the run was stopped by the pre-timeout signal, so a long run spans several allocations.
#   sbatch jobs/slurm.sh CONFIG RUN_DIR    (or: CONFIG=... RUN_DIR=... sbatch jobs/slurm.sh)
#   ES_MPI_DRY_RUN=1 bash jobs/slurm.sh CONFIG RUN_DIR   prints the srun command, runs nothing
#SBATCH --job-name=es-mpi
#SBATCH --nodes=2                 # site-specific: nodes x ntasks-per-node = ranks
#SBATCH --ntasks-per-node=4       # site-specific: = GPUs per node
#SBATCH --gpus-per-task=1         # one GPU per rank (remove on CPU-only partitions)
#SBATCH --cpus-per-task=8         # CPU runs: make runtime.threads equal to this
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@300         # 5 min before the limit every rank gets SIGUSR1 and stops
#                                 # after its current iteration (exit code 75)
#SBATCH --requeue                 # lets the job requeue itself below
#SBATCH --open-mode=append        # a requeued job appends to the same output file
#SBATCH --output=%x-%j.out
# #SBATCH --partition=gpu         # site-specific
# #SBATCH --account=myproject     # site-specific
set -uo pipefail
CONFIG=${1:-${CONFIG:-configs/default.yaml}}
RUN_DIR=${2:-${RUN_DIR:-runs/slurm-${SLURM_JOB_ID:-local}}}
DEVICE=${DEVICE:-auto}                      # auto | cuda | cpu
RANKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-4}
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-8}
GPUS_PER_TASK=${GPUS_PER_TASK:-1}           # 0 on CPU-only partitions

# Site-specific: the MPI that mpi4py was built against, then the environment.
# module load openmpi cuda
# source .venv/bin/activate          # or: conda activate es-mpi

if [ -f "$RUN_DIR/run.h5" ]; then
  ARGS=(resume --run-dir "$RUN_DIR" --device "$DEVICE")
else
  ARGS=(train --config "$CONFIG" --run-dir "$RUN_DIR" --device "$DEVICE")
fi
CMD=(srun --ntasks-per-node="$RANKS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK")
[ "$GPUS_PER_TASK" -gt 0 ] && CMD+=(--gpus-per-task="$GPUS_PER_TASK")
CMD+=(es-mpi "${ARGS[@]}")

if [ "${ES_MPI_DRY_RUN:-0}" = 1 ]; then
  echo "${CMD[*]}"
  exit 0
fi
"${CMD[@]}"
rc=$?
if [ "$rc" -eq 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "es-mpi stopped before the time limit; requeueing job $SLURM_JOB_ID to resume"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
