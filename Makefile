# One-command workflows. Every target sets up the virtual environment first (pinned by constraints.txt).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Where MNIST/ and tinyshakespeare/ live; downloaded there on first use when the machine has internet.
KILN_DATA_ROOT ?= data
export KILN_DATA_ROOT

.PHONY: install train test lint bench gpu-check check-recipes lock clean slurm-up slurm-down slurm-test

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

train: install            ## train the default recipe (AdamW, warmup + cosine, MNIST VAE)
	$(BIN)/python train.py recipe=mnist_vae $(ARGS)

test: install             ## the test suite (needs the data root: KILN_DATA_ROOT=../shared/data make test)
	$(BIN)/python -m pytest -n auto --maxprocesses=4 --maxschedchunk=1 $(ARGS)

lint: install
	$(BIN)/ruff check .

bench: install            ## figures, not tests: trainer overhead, optimizer step time/state, char-GPT speed, data paths
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/optimizers.py --threads 1
	$(BIN)/python bench/char_transformer.py
	$(BIN)/python bench/data_path.py

gpu-check: install        ## the cuda tests (tests/cuda), then the GPU figures (bench/gpu.py; ARGS=--quick: no full recipe)
	@if $(BIN)/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(BIN)/python -m pytest -m cuda tests/cuda && $(BIN)/python bench/gpu.py $(ARGS); \
	else echo "gpu-check: no CUDA GPU here, nothing run (the CPU variants of tests/cuda run in make test)"; fi

check-recipes: install   ## every recipe's short version against its declared result (ARGS=--full: the real runs)
	$(BIN)/python -m experiments.check_recipes $(ARGS)

slurm-up:                 ## a single-node SLURM on this machine (root; installs slurm-wlm + munge if missing): sweep=slurm runs on it
	scripts/slurm.sh up

slurm-down:               ## stop the daemons slurm-up started (by their recorded pids)
	scripts/slurm.sh down

slurm-test: install       ## the tests marked slurm against the running cluster, their lines shown (jobs, results)
	$(BIN)/python -m pytest -m slurm -s -v tests/experiments/test_slurm.py $(ARGS)

lock: install             ## rewrite constraints.txt from the current venv
	{ head -2 constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^kiln'; } > constraints.tmp && mv constraints.tmp constraints.txt

clean:
	rm -rf $(VENV) runs multirun .pytest_cache
