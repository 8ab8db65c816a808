#!/bin/bash
# make test-slurm: a single-node Slurm for the duration of tests/test_slurm.py, then stopped.
# Where the packages cannot be installed (no root, no apt-get), the tests are skipped with the
# reason printed, and the exit code is 0.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
if ! bash tests/slurm/cluster.sh install; then
  echo "test-slurm: SKIPPED: the Slurm packages (munge slurmctld slurmd slurm-client) are" \
    "not installed and cannot be installed here"
  exit 0
fi
STATE=$(mktemp -d /tmp/es-mpi-slurm.XXXXXX)
trap 'bash tests/slurm/cluster.sh stop "$STATE"' EXIT
bash tests/slurm/cluster.sh start "$STATE" || exit 1
export SLURM_CONF=$STATE/slurm.conf ES_MPI_TEST_SLURM=1 ES_MPI_SLURM_REPORT=$STATE/report
"$PY" -m pytest -q -p no:cacheprovider -m slurm tests/test_slurm.py "$@"
rc=$?
echo "test-slurm: what the jobs did (Slurm $(sinfo -V | cut -d' ' -f2)):"
sed 's/^/  /' "$STATE/report" 2>/dev/null
[ "$rc" -eq 0 ] || tail -n 30 "$STATE"/slurmctld.log "$STATE"/slurmd.log
exit "$rc"
