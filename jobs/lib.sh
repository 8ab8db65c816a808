# Shared by jobs/slurm.sh, jobs/sweep.sh and jobs/pbs.sh (sourced from the repository root,
# where the job was submitted). docs/clusters.md explains each step.

# The environment on the compute node: ES_MPI_SETUP names a file with the site's lines
# (module load ..., conda activate ...); without it the repository's .venv is activated.
es_mpi_setup() {
  if [ -n "${ES_MPI_SETUP:-}" ]; then
    if [ ! -f "$ES_MPI_SETUP" ]; then
      echo "es-mpi job: ES_MPI_SETUP=$ES_MPI_SETUP is not a file" >&2
      exit 2
    fi
    # shellcheck disable=SC1090
    source "$ES_MPI_SETUP" || { echo "es-mpi job: sourcing $ES_MPI_SETUP failed" >&2; exit 2; }
  elif [ -f .venv/bin/activate ]; then
    source .venv/bin/activate
  fi
  if [ "${ES_MPI_DRY_RUN:-0}" != 1 ] && ! command -v es-mpi >/dev/null; then
    echo "es-mpi job: es-mpi is not on PATH on $(hostname); set ES_MPI_SETUP to a file that" \
      "activates its environment (jobs/setup.example.sh)" >&2
    exit 2
  fi
}

# cuda when the scheduler gave the job GPUs (a CPU-only torch then fails by name), else auto.
default_device() {  # $1: the job's GPU count as the scheduler reports it (may be empty)
  local count=${1##*:}
  if [ -n "$count" ] && [ "$count" -gt 0 ] 2>/dev/null; then echo cuda; else echo auto; fi
}

# ARGS: train, or resume when the run dir already holds a run log (extra args: train only).
set_run_args() {  # $1 config, $2 run dir, $3 device, then --set ... for a new run
  local config=$1 run_dir=$2 device=$3
  shift 3
  if [ -f "$run_dir/run.h5" ]; then
    ARGS=(resume --run-dir "$run_dir" --device "$device")
  else
    ARGS=(train --config "$config" --run-dir "$run_dir" --device "$device" "$@")
  fi
}

# CMD: srun of es-mpi ARGS. --mpi: the PyPI MPICH (and most site MPIs) speak PMI-1/2, which
# Slurm serves with pmi2; without it every task is a 1-rank world. srun of Slurm 22.05 does
# not inherit cpus-per-task from the allocation.
set_slurm_command() {
  CMD=(srun --mpi="${ES_MPI_SRUN_MPI:-pmi2}" --kill-on-bad-exit=1)
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && CMD+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  CMD+=(es-mpi "${ARGS[@]}")
}

# ES_MPI_DRY_RUN=1: print CMD and stop there.
dry_run_exit() {
  if [ "${ES_MPI_DRY_RUN:-0}" = 1 ]; then
    echo "${CMD[*]}"
    exit 0
  fi
}

# Run CMD for the run in $1; requeue this job on a resumable stop; exit with es-mpi's code.
run_slurm_step() {
  local run_dir=$1 before rc
  before=$(iterations_done "$run_dir")
  launch "${CMD[@]}"
  rc=$?
  if should_continue "$rc" "$before" "$(iterations_done "$run_dir")" "${SLURM_RESTART_COUNT:-0}"
  then
    # An array member is named ARRAY_TASK: the bare id of one member can be the array's own
    # id, and `scontrol requeue ARRAYID` requeues every member.
    local job=$SLURM_JOB_ID
    [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && job=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
    echo "es-mpi job: stopped resumably; requeueing job $job into $run_dir"
    scontrol requeue "$job"  # this shell is killed by the requeue (Slurm 22.05)
  fi
  exit "$rc"
}

# Run the launcher in the background and wait for it. The launcher inherits an ignored TERM:
# Hydra's mpiexec dies on TERM and takes the ranks with it before they checkpoint (es-mpi
# installs its own handler). TERM or USR1 to this shell (a walltime, scancel --batch,
# --signal=B:USR1) is passed on as USR1, which srun and mpiexec forward to every rank.
launch() {
  local pid rc forwarded
  trap '' TERM
  "$@" &
  pid=$!
  trap 'forwarded=1; echo "es-mpi job: stop signal, passed on to the ranks"; kill -USR1 '"$pid"' 2>/dev/null' TERM USR1
  while :; do
    forwarded=0
    wait "$pid"
    rc=$?
    [ "$forwarded" = 1 ] || break
  done
  trap - TERM USR1
  return "$rc"
}

iterations_done() {  # $1 run dir; empty when there is no run log yet
  [ -f "$1/run.h5" ] || return 0
  es-mpi inspect --run-dir "$1" --json 2>/dev/null \
    | python -c 'import json,sys; print(json.load(sys.stdin)["iterations_done"])' 2>/dev/null
}

# Another allocation is asked for only when it is safe: the run stopped resumably (75), this
# allocation moved it forward, and the restarts so far are below ES_MPI_MAX_RESTARTS.
should_continue() {  # $1 exit code, $2 iterations before, $3 after, $4 restarts so far
  local rc=$1 before=${2:-0} after=${3:-0} restarts=${4:-0} max=${ES_MPI_MAX_RESTARTS:-20}
  [ "$rc" -eq 75 ] || return 1
  if [ "$after" -le "$before" ]; then
    echo "es-mpi job: no iteration done in this allocation ($before); not continuing" >&2
    return 1
  fi
  if [ "$restarts" -ge "$max" ]; then
    echo "es-mpi job: $restarts restarts reached ES_MPI_MAX_RESTARTS=$max; not continuing" >&2
    return 1
  fi
}

# DEVICE (cuda when the job has GPUs) and ES_MPI_JOB_END for a Slurm job.
slurm_job_settings() {
  DEVICE=${DEVICE:-$(default_device "${SLURM_GPUS_PER_TASK:-${SLURM_GPUS_ON_NODE:-}}")}
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    ES_MPI_JOB_END=${ES_MPI_JOB_END:-$(slurm_job_end)}
    export ES_MPI_JOB_END
  fi
}

# The job's end as a Unix time, for es-mpi to stop (exit 75) before it (runtime.stop_margin_seconds).
slurm_job_end() {
  local end
  end=$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null) || return 0
  date -d "$end" +%s 2>/dev/null || true
}

hms_seconds() {  # [[HH:]MM:]SS -> seconds
  local IFS=: total=0 part
  for part in $1; do total=$((total * 60 + 10#$part)); done
  echo "$total"
}
