#!/bin/bash
# SLURM batch job: one MPI rank per GPU. Starts the run, or resumes it when its log exists.
#   sbatch jobs/slurm.sh CONFIG RUN_DIR      (or CONFIG=... RUN_DIR=... sbatch jobs/slurm.sh)
#SBATCH --job-name=es-mpi
#SBATCH --nodes=2                 # site-specific: nodes x ranks per node = ranks
#SBATCH --ntasks-per-node=4       # = GPUs per node
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8         # set runtime.threads to this for CPU-only runs
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
CONFIG=${1:-${CONFIG:-configs/default.yaml}}
RUN_DIR=${2:-${RUN_DIR:-runs/slurm-${SLURM_JOB_ID:-local}}}

# Site-specific: load the MPI that mpi4py was built against, then the environment.
# module load openmpi cuda
# source .venv/bin/activate          # or: conda activate es-mpi

if [ -f "$RUN_DIR/run.h5" ]; then
  ARGS=(resume --run-dir "$RUN_DIR")
else
  ARGS=(train --config "$CONFIG" --run-dir "$RUN_DIR")
fi
srun es-mpi "${ARGS[@]}"
