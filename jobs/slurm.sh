#!/bin/bash
# Slurm batch job: one MPI rank per GPU (or per group of cores on CPU nodes). Starts the run,
# or resumes it when RUN_DIR holds a run log. es-mpi stops itself before the job's end (or on
# USR1/TERM: a preemption, the --signal warning) with a checkpoint and exit 75; the job then
# requeues itself into the same RUN_DIR, so a long run spans several allocations.
# Submit from the repository root (docs/clusters.md):
#   sbatch jobs/slurm.sh CONFIG RUN_DIR
#   ES_MPI_SETUP=jobs/setup.sh sbatch jobs/slurm.sh ...   site modules / environment
#   ES_MPI_DRY_RUN=1 bash jobs/slurm.sh CONFIG RUN_DIR     prints the srun command only
# Site-specific lines: nodes, tasks per node (= GPUs per node), GPUs, cores, time; add
# --partition/--account as your site requires. sbatch options on the command line win.
#SBATCH --job-name=es-mpi
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
source jobs/lib.sh
CONFIG=${1:-${CONFIG:-configs/default.yaml}}
RUN_DIR=${2:-${RUN_DIR:-runs/slurm-${SLURM_JOB_ID:-local}}}
es_mpi_setup
slurm_job_settings

set_run_args "$CONFIG" "$RUN_DIR" "$DEVICE"
set_slurm_command
dry_run_exit
run_slurm_step "$RUN_DIR"
