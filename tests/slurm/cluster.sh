#!/bin/bash
# A single-node Slurm for the end-to-end job tests (make test-slurm): munged, slurmctld and
# slurmd started in the foreground as background children with their own pid files, all state
# under one directory, stopped by those pids only (nothing else on the machine is touched).
#   tests/slurm/cluster.sh install    apt-get the Debian packages (root; exit 3 if impossible)
#   tests/slurm/cluster.sh start DIR  write DIR/slurm.conf, start the daemons, wait for the node
#   tests/slurm/cluster.sh stop DIR   stop what start started
# Clients then need SLURM_CONF=DIR/slurm.conf in their environment.
set -euo pipefail
PACKAGES=(munge slurmctld slurmd slurm-client)
OPTIONAL=(libmpich12)  # Debian's MPICH: stands in for a site MPI in tests/test_slurm.py

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v munged >/dev/null && command -v sbatch >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s "${OPTIONAL[@]}" >/dev/null 2>&1; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${OPTIONAL[@]}" >/dev/null 2>&1 || true
    fi
    return 0
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "cannot install ${PACKAGES[*]}: needs root and apt-get" >&2
    exit 3
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq "${PACKAGES[@]}"; } >/dev/null 2>&1; then
    echo "apt-get install ${PACKAGES[*]} failed" >&2
    exit 3
  fi
  apt-get install -y -qq "${OPTIONAL[@]}" >/dev/null 2>&1 || true
}

write_conf() {  # $1 state dir
  local dir=$1 host cpus
  host=$(hostname -s)
  cpus=$(nproc)
  cat > "$dir/slurm.conf" <<CONF
ClusterName=esmpi-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${ES_MPI_SLURM_PORT:-16817}
SlurmdPort=$(( ${ES_MPI_SLURM_PORT:-16817} + 1 ))
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays the restart of a requeued job (default 120 s)
AuthInfo=socket=$dir/munge.socket,cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=10
OverTimeLimit=0
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
}

start() {  # $1 state dir
  local dir=$1
  install_packages
  mkdir -p "$dir/state" "$dir/spool"
  dir=$(cd "$dir" && pwd)
  chmod 700 "$dir"
  if [ ! -f "$dir/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge.key" bs=1 count=1024 status=none
    chmod 400 "$dir/munge.key"
  fi
  write_conf "$dir"
  export SLURM_CONF=$dir/slurm.conf
  munged -F --force --socket="$dir/munge.socket" --key-file="$dir/munge.key" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munged.seed" \
    >>"$dir/munged.out" 2>&1 &
  echo $! > "$dir/munged.started"
  wait_for "munge socket" test -S "$dir/munge.socket"
  slurmctld -D -i -f "$dir/slurm.conf" >>"$dir/slurmctld.out" 2>&1 &
  echo $! > "$dir/slurmctld.started"
  slurmd -D -f "$dir/slurm.conf" >>"$dir/slurmd.out" 2>&1 &
  echo $! > "$dir/slurmd.started"
  wait_for "node idle" node_idle
  echo "slurm up: SLURM_CONF=$dir/slurm.conf"
}

node_idle() { sinfo -h -o %T 2>/dev/null | grep -q '^idle'; }

wait_for() {  # $1 what; the rest: a command that succeeds when ready
  local what=$1
  shift
  for _ in $(seq 1 300); do
    "$@" && return 0
    sleep 0.1
  done
  echo "slurm test cluster: timed out waiting for $what (logs in $dir)" >&2
  tail -n 20 "$dir"/*.log >&2 || true
  return 1
}

stop() {  # $1 state dir
  local dir=$1 name pid
  for name in slurmd slurmctld munged; do
    [ -f "$dir/$name.started" ] || continue
    pid=$(cat "$dir/$name.started")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/$name.started"
  done
}

case "${1:-}" in
  install) install_packages ;;
  start) start "${2:?state dir}" ;;
  stop) stop "${2:?state dir}" ;;
  *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
