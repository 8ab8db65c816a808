# es-mpi: `make install`, `make test`, `make run`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MPIEXEC := $(VENV)/bin/mpiexec
RUN_DIR ?= runs/default
RANKS ?= 2
PYTEST_MPI := -m mpi4py -m pytest --with-mpi -p no:cacheprovider -q
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install install-rl install-site-mpi test test-serial test-mpi test-slurm run bench bench-learning bench-paper \
	bench-scale bench-rl lint model fixtures \
	pretrain-model paper-data clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# The GRPO baseline's optional dependencies (TRL).
install-rl: $(VENV)/.installed-rl

$(VENV)/.installed-rl: requirements-rl.txt $(VENV)/.installed
	$(PY) -m pip install -q -r requirements-rl.txt
	touch $@

# The site's MPI instead of the PyPI MPICH wheel (docs/clusters.md): with the wheel gone from
# .venv, mpi4py loads libmpi.so.12 from LD_LIBRARY_PATH, which `module load <mpi>` sets (in
# ES_MPI_SETUP for jobs), and the site's mpiexec/srun starts the ranks. Check on a compute
# node: srun --mpi=pmi2 -n 2 .venv/bin/es-mpi doctor
install-site-mpi: install
	$(PY) -m pip uninstall -q -y mpich

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: test-serial test-mpi

test-serial: install install-rl
	$(PY) -m pytest -q -p no:cacheprovider tests; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ] || exit $$rc

test-mpi: install
	$(MPIEXEC) -n 2 $(PY) $(PYTEST_MPI) -m mpi tests; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ] || exit $$rc
	$(MPIEXEC) -n 3 $(PY) $(PYTEST_MPI) -m mpi -k invariance tests; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ] || exit $$rc

# The job scripts end to end on a single-node Slurm started (and stopped) for the purpose:
# Debian packages, root; skipped with the reason printed where they cannot be installed.
test-slurm: install
	PY=$(PY) bash tests/slurm/run-tests.sh

run: install
	$(MPIEXEC) -n $(RANKS) $(VENV)/bin/es-mpi train --config configs/default.yaml --run-dir $(RUN_DIR) --overwrite
	$(VENV)/bin/es-mpi inspect --run-dir $(RUN_DIR)

bench: install
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/lowrank.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/failures.py

# Every configs/paper/*.yaml for 2 iterations on each chat fixture, 1 rank against RANKS.
bench-paper: install
	$(PY) benchmarks/paper_configs.py --ranks $(RANKS)

# Cost per rank from 0.17M to 0.5B parameters: random models of real configurations (built
# under runs/scale-models on first use, 1.5 GB), 1 and 2 ranks; table and PNG in bench-results/.
bench-scale: install
	$(PY) benchmarks/scale.py

# ES (2 ranks) against GRPO (TRL, 2 threads): same task, base, reward, held-out and training
# time; 3 seeds x 10 minutes x 2 methods on the default, then 3 x 2.5 on conciseness (reward-KL).
bench-rl: install install-rl
	$(PY) benchmarks/es_vs_grpo.py --config configs/default.yaml --minutes 10
	$(PY) benchmarks/es_vs_grpo.py --config configs/conciseness.yaml --minutes 2.5 \
		--eval-seconds 30 --out bench-results/es-vs-grpo-conciseness

# Held-out accuracy of the default against wall time for 3 run seeds (30 minutes on 2 cores).
bench-learning: install
	$(PY) benchmarks/learning.py --config configs/default.yaml

lint: install
	$(VENV)/bin/ruff check src tests benchmarks bin/es-mpi
	$(VENV)/bin/ruff format --check src tests benchmarks bin/es-mpi

# Rebuild the shipped tiny models (deterministic from their seeds; models/README.md).
model: install
	$(VENV)/bin/es-mpi init-model --out models/tiny-random --seed 0

# The chat fixtures: Qwen2, Llama-3 and Gemma-3 architectures with BPE tokenizers, chat
# templates and two end ids (random weights; rebuilt byte for byte).
fixtures: install
	for family in qwen2 llama3 gemma3; do \
		$(VENV)/bin/es-mpi init-model --family $$family --out models/$$family-tiny-chat || exit 1; \
	done

# The paper's Countdown file (academic-use licence: not redistributed here; data/README.md).
COUNTDOWN_JSON ?= ../shared/data/countdown.json
paper-data: install
	$(PY) -c "from es_mpi.tasks.countdown import load_problems as l; l('$(COUNTDOWN_JSON)')"
	cp $(COUNTDOWN_JSON) data/countdown.json

# Shared by every pretrained base; ESNOISE is the recipe of the default's bases (pretrained
# under the noise the default's ES applies).
PRETRAIN = $(VENV)/bin/es-mpi pretrain --seed 0 --threads 2 --config configs/default.yaml
ESNOISE = --weight-noise 0.3 --tag-tokens --noise-multipliers "norm=10,embed=0.5"

pretrain-model: install
	$(PRETRAIN) --out models/tiny-countdown --steps 250
	$(PRETRAIN) --out models/tiny-countdown-robust --steps 250 --weight-noise 0.1
	$(PRETRAIN) --out models/tiny-countdown-h64 --steps 700 --hidden 64 --layers 3 --heads 2 \
		$(ESNOISE)
	$(PRETRAIN) --out models/qwen2-countdown-chat --family qwen2 --steps 1000 --hidden 64 \
		--layers 3 --heads 4 --weight-noise 0.3 --noise-multipliers "norm=10,embed=0.5" \
		--config configs/countdown-chat.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
