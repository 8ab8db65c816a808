#!/bin/bash
# Slurm job array for sweeps (population, sigma, rank, ...): array task i runs line i of the
# sweep file (blank lines and # comments skipped) in SWEEP_DIR/NAME, and resumes it there when
# the member is requeued or resubmitted. Submit from the repository root with --submit, which
# sets --array from the file's line count (extra sbatch options before FILE):
#   bash jobs/sweep.sh --submit [SBATCH_OPTION ...] jobs/sweep.example.txt runs/sweep1
#   es-mpi plot --run-dir runs/sweep1/N30 --run-dir runs/sweep1/N60 --out sweep.png
# Line format: NAME key=value [key=value ...]   (config overrides on top of CONFIG)
#   ES_MPI_DRY_RUN=1 SLURM_ARRAY_TASK_ID=1 bash jobs/sweep.sh FILE DIR   prints the command
#SBATCH --job-name=es-mpi-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
source jobs/lib.sh

sweep_lines() { grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$1"; }

if [ "${1:-}" = --submit ]; then
  shift
  [ $# -ge 2 ] || { echo "usage: $0 --submit [SBATCH_OPTION ...] FILE SWEEP_DIR" >&2; exit 2; }
  FILE=${*: -2:1}
  DIR=${*: -1:1}
  [ -f "$FILE" ] || { echo "sweep: no sweep file $FILE" >&2; exit 2; }
  COUNT=$(sweep_lines "$FILE" | wc -l)
  [ "$COUNT" -gt 0 ] || { echo "sweep: $FILE has no lines to run" >&2; exit 2; }
  exec sbatch --array="0-$((COUNT - 1))" "${@:1:$#-2}" "$0" "$FILE" "$DIR"
fi

SWEEP_FILE=${1:-${SWEEP_FILE:-}}
SWEEP_DIR=${2:-${SWEEP_DIR:-}}
if [ -z "$SWEEP_FILE" ] || [ -z "$SWEEP_DIR" ]; then
  echo "sweep: give the sweep file and an explicit sweep dir: $0 FILE SWEEP_DIR" >&2
  exit 2
fi
CONFIG=${CONFIG:-configs/default.yaml}
TASK=${SLURM_ARRAY_TASK_ID:-0}
COUNT=$(sweep_lines "$SWEEP_FILE" | wc -l)
if [ -n "${SLURM_ARRAY_TASK_MAX:-}" ] && [ "$((SLURM_ARRAY_TASK_MAX + 1))" -ne "$COUNT" ]; then
  echo "sweep: --array ends at $SLURM_ARRAY_TASK_MAX but $SWEEP_FILE has $COUNT lines" \
    "(use: bash jobs/sweep.sh --submit ...)" >&2
  exit 2
fi
LINE=$(sweep_lines "$SWEEP_FILE" | sed -n "$((TASK + 1))p")
if [ -z "$LINE" ]; then
  echo "sweep: no line $TASK in $SWEEP_FILE" >&2
  exit 2
fi
read -r NAME SETTINGS <<< "$LINE"
SETS=()
for kv in $SETTINGS; do SETS+=(--set "$kv"); done
RUN_DIR="$SWEEP_DIR/$NAME"
es_mpi_setup
slurm_job_settings

set_run_args "$CONFIG" "$RUN_DIR" "$DEVICE" "${SETS[@]}"
set_slurm_command
dry_run_exit
mkdir -p "$SWEEP_DIR"
run_slurm_step "$RUN_DIR"
