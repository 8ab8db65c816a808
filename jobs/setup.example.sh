# Copy to jobs/setup.sh (or anywhere), edit, and submit with ES_MPI_SETUP=jobs/setup.sh.
# Sourced by every job script on the compute node before es-mpi starts (docs/clusters.md).
# module load cuda/12.4 cray-mpich        # the site's MPI: see `make install-site-mpi`
# source .venv/bin/activate               # or: conda activate es-mpi
