#!/bin/bash
# One prepared check for a GPU machine with no internet and its own torch / transformers /
# h5py / mpi4py: runs es-mpi from src/ (nothing installed), finishes in minutes on one GPU.
# Prints one line per check ([gpu-check] PASS|FAIL ...) and writes OUT/gpu_check.json.
#   bash benchmarks/gpu_check.sh [OUT]                          on the GPU machine
#   DEVICE=cpu SIZE=small bash benchmarks/gpu_check.sh [OUT]    the dry run on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
PY=${PY:-$(command -v python3)}
MPIEXEC=${MPIEXEC:-$(command -v mpiexec || echo "$(dirname "$PY")/mpiexec")}
exec "$PY" benchmarks/gpu_check.py --device "${DEVICE:-cuda}" --size "${SIZE:-0.5b}" \
  --mpiexec "$MPIEXEC" --out "${1:-bench-results/gpu-check}"
