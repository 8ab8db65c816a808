#!/bin/bash
# PBS batch job: one MPI rank per GPU. Starts the run, or resumes it when its log exists.
#   qsub -v CONFIG=configs/default.yaml,RUN_DIR=runs/x jobs/pbs.sh
#PBS -N es-mpi
#PBS -l select=2:ncpus=32:ngpus=4:mpiprocs=4   # site-specific resource syntax
#PBS -l walltime=04:00:00
#PBS -j oe
set -euo pipefail
cd "${PBS_O_WORKDIR:-.}"
CONFIG=${CONFIG:-configs/default.yaml}
RUN_DIR=${RUN_DIR:-runs/pbs-${PBS_JOBID:-local}}
RANKS_PER_NODE=${RANKS_PER_NODE:-4}
NODES=$(sort -u "${PBS_NODEFILE:-/dev/null}" | wc -l); NODES=${NODES:-1}; [ "$NODES" -ge 1 ] || NODES=1

# Site-specific: module load cray-mpich cuda; source .venv/bin/activate

if [ -f "$RUN_DIR/run.h5" ]; then
  ARGS=(resume --run-dir "$RUN_DIR")
else
  ARGS=(train --config "$CONFIG" --run-dir "$RUN_DIR")
fi
mpiexec -n $((NODES * RANKS_PER_NODE)) --ppn "$RANKS_PER_NODE" es-mpi "${ARGS[@]}"
