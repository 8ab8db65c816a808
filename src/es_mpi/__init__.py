"""es-mpi: Evolution Strategies fine-tuning of language models, parallel over MPI."""

__version__ = "0.1.0"
