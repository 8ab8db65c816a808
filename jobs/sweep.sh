#!/bin/bash
# SLURM job array for sweeps (population, sigma, rank, ...): array task i runs line i of
# the sweep file (blank lines and # comments skipped) in its own run dir SWEEP_DIR/NAME.
#   sbatch --array=0-3 jobs/sweep.sh jobs/sweep.example.txt runs/sweep1
#   es-mpi plot --run-dir runs/sweep1/N30 --run-dir runs/sweep1/N60 --out sweep.png
# Line format: NAME key=value [key=value ...]   (config overrides on top of CONFIG)
#   ES_MPI_DRY_RUN=1 SLURM_ARRAY_TASK_ID=1 bash jobs/sweep.sh FILE DIR  prints the command
#SBATCH --job-name=es-mpi-sweep
#SBATCH --nodes=1                 # site-specific
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=%x-%A_%a.out
set -uo pipefail
SWEEP_FILE=${1:-${SWEEP_FILE:-jobs/sweep.example.txt}}
SWEEP_DIR=${2:-${SWEEP_DIR:-runs/sweep-${SLURM_ARRAY_JOB_ID:-local}}}
CONFIG=${CONFIG:-configs/default.yaml}
TASK=${SLURM_ARRAY_TASK_ID:-0}

LINE=$(grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$SWEEP_FILE" | sed -n "$((TASK + 1))p")
if [ -z "$LINE" ]; then
  echo "sweep: no line $TASK in $SWEEP_FILE" >&2
  exit 2
fi
read -r NAME SETTINGS <<< "$LINE"
SETS=()
for kv in $SETTINGS; do SETS+=(--set "$kv"); done
RUN_DIR="$SWEEP_DIR/$NAME"
if [ -f "$RUN_DIR/run.h5" ]; then
  ARGS=(resume --run-dir "$RUN_DIR")
else
  ARGS=(train --config "$CONFIG" --run-dir "$RUN_DIR" "${SETS[@]}")
fi
CMD=(srun es-mpi "${ARGS[@]}")
if [ "${ES_MPI_DRY_RUN:-0}" = 1 ]; then
  echo "${CMD[*]}"
  exit 0
fi
mkdir -p "$SWEEP_DIR"
exec "${CMD[@]}"
