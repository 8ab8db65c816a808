#!/bin/bash
# PBS (OpenPBS / PBS Pro) batch job: one MPI rank per GPU. Starts the run, or resumes it when
# RUN_DIR holds a run log. es-mpi stops itself before the walltime (or on the SIGTERM PBS
# sends at it) with a checkpoint and exit 75; the job then submits its continuation, which
# resumes in the same RUN_DIR. Submit from the repository root (docs/clusters.md):
#   qsub -v CONFIG=configs/default.yaml,RUN_DIR=runs/x,ES_MPI_SETUP=jobs/setup.sh jobs/pbs.sh
#   ES_MPI_DRY_RUN=1 CONFIG=... RUN_DIR=... bash jobs/pbs.sh   prints the mpiexec command only
# Site-specific: the select line (chunks = nodes; ncpus, ngpus = mpiprocs = ranks per node),
# walltime; add -q QUEUE / -A ACCOUNT as your site requires. PBS reads no text after a
# directive's arguments, so directives carry no comments.
#PBS -N es-mpi
#PBS -l select=2:ncpus=32:ngpus=4:mpiprocs=4
#PBS -l place=scatter
#PBS -l walltime=04:00:00
#PBS -r y
#PBS -j oe
set -uo pipefail
cd "${PBS_O_WORKDIR:-.}"
source jobs/lib.sh
CONFIG=${1:-${CONFIG:-configs/default.yaml}}
RUN_DIR=${2:-${RUN_DIR:-runs/pbs-${PBS_JOBID:-local}}}
es_mpi_setup

# The job's resources as PBS reports them (qstat -f), for the GPU default and the walltime.
pbs_resource() { qstat -f "$PBS_JOBID" 2>/dev/null | sed -n "s/^ *$1 = //p" | head -n 1; }
if [ -n "${PBS_JOBID:-}" ]; then
  DEVICE=${DEVICE:-$(default_device "$(pbs_resource Resource_List.ngpus)")}
  WALLTIME=$(pbs_resource Resource_List.walltime)
  USED=$(pbs_resource resources_used.walltime)
  if [ -n "$WALLTIME" ] && [ -z "${ES_MPI_JOB_END:-}" ]; then
    ES_MPI_JOB_END=$(($(date +%s) + $(hms_seconds "$WALLTIME") - $(hms_seconds "${USED:-0}")))
    export ES_MPI_JOB_END
  fi
fi
DEVICE=${DEVICE:-auto}
# Ranks: one per line of PBS_NODEFILE (mpiprocs per chunk), nodes: its distinct hosts.
if [ -n "${PBS_NODEFILE:-}" ] && [ -f "$PBS_NODEFILE" ]; then
  RANKS=$(grep -c . "$PBS_NODEFILE")
  NODES=$(sort -u "$PBS_NODEFILE" | grep -c .)
else
  RANKS=${RANKS:-8}
  NODES=${NODES:-2}
fi

set_run_args "$CONFIG" "$RUN_DIR" "$DEVICE"
# --ppn is MPICH/Cray syntax; Open MPI: --map-by ppr:N:node. Use the site's mpiexec (its
# ES_MPI_SETUP), which starts ranks through PBS, not the PyPI wheel's (ssh).
CMD=("${ES_MPI_MPIEXEC:-mpiexec}" -n "$RANKS" --ppn "$((RANKS / NODES))" es-mpi "${ARGS[@]}")
dry_run_exit

before=$(iterations_done "$RUN_DIR")
launch "${CMD[@]}"
rc=$?
RESTARTS=${ES_MPI_RESTARTS:-0}
if should_continue "$rc" "$before" "$(iterations_done "$RUN_DIR")" "$RESTARTS"; then
  echo "es-mpi job: stopped resumably; submitting the continuation of $RUN_DIR"
  qsub -v "CONFIG=$CONFIG,RUN_DIR=$RUN_DIR,DEVICE=$DEVICE,ES_MPI_SETUP=${ES_MPI_SETUP:-},ES_MPI_RESTARTS=$((RESTARTS + 1))" \
    jobs/pbs.sh
fi
exit "$rc"
