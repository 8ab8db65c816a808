#!/bin/bash
# PBS batch job: one MPI rank per GPU. Starts the run, or resumes it when RUN_DIR holds a
# run log; resubmits itself when the run was stopped by SIGTERM before the walltime.
#   qsub -v CONFIG=configs/default.yaml,RUN_DIR=runs/x jobs/pbs.sh
#   ES_MPI_DRY_RUN=1 CONFIG=... RUN_DIR=... bash jobs/pbs.sh   prints the mpiexec command
#PBS -N es-mpi
#PBS -l select=2:ncpus=32:ngpus=4:mpiprocs=4   # site-specific resource syntax
#PBS -l walltime=04:00:00
#PBS -r y
#PBS -j oe
# #PBS -q gpu                                   # site-specific queue
# #PBS -A myproject                             # site-specific account
set -uo pipefail
cd "${PBS_O_WORKDIR:-.}"
CONFIG=${1:-${CONFIG:-configs/default.yaml}}
RUN_DIR=${2:-${RUN_DIR:-runs/pbs-${PBS_JOBID:-local}}}
DEVICE=${DEVICE:-auto}
RANKS_PER_NODE=${RANKS_PER_NODE:-4}             # = mpiprocs above = GPUs per node
NODES=${NODES:-$( [ -n "${PBS_NODEFILE:-}" ] && sort -u "$PBS_NODEFILE" | wc -l || echo 2 )}

# Site-specific: module load cray-mpich cuda; source .venv/bin/activate

if [ -f "$RUN_DIR/run.h5" ]; then
  ARGS=(resume --run-dir "$RUN_DIR" --device "$DEVICE")
else
  ARGS=(train --config "$CONFIG" --run-dir "$RUN_DIR" --device "$DEVICE")
fi
# --ppn is MPICH/Cray syntax; Open MPI: --map-by ppr:$RANKS_PER_NODE:node
CMD=(mpiexec -n $((NODES * RANKS_PER_NODE)) --ppn "$RANKS_PER_NODE" es-mpi "${ARGS[@]}")

if [ "${ES_MPI_DRY_RUN:-0}" = 1 ]; then
  echo "${CMD[*]}"
  exit 0
fi
"${CMD[@]}"
rc=$?
if [ "$rc" -eq 75 ]; then   # PBS sent SIGTERM before the walltime kill: continue in a new job
  echo "es-mpi stopped early; resubmitting to resume $RUN_DIR"
  qsub -v "CONFIG=$CONFIG,RUN_DIR=$RUN_DIR,DEVICE=$DEVICE" "$0"
  exit 0
fi
exit "$rc"
