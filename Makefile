# alignpipe: `make pipeline` runs the embedded default recipe, `make test` runs the tests (`make test-fast`: those
# that train no model).
# Both create .venv and install on first use. GPU users: see README ("Bring your own torch").

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= recipes/default.yaml
TORCH ?= torch==2.13.0
ARGS ?=
# One torch thread: measured here, two threads beside a busy core made a step ~170x slower.
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
ACCELERATE ?=
NPROC ?= 1
# stages whose upstreams are complete (dpo and ppo after reward) run at the same time, one 1-thread process
# each, when the machine has the cores (auto: usable cores / OMP_NUM_THREADS); PARALLEL=1 runs them in turn
PARALLEL ?= auto
# trainer stages' torch threads: auto = the usable cores shared among the stages the recipe runs at once, at most 2
# (thread_choice.py; from the machine and the recipe only, so a busy neighbour never changes the figures)
THREADS ?= auto
# The packages after torch: uv by default (measured here: 6 s for what pip took 69 s); INSTALLER=pip for
# pip, e.g. where the packages come from an index set in pip.conf, which uv does not read.
INSTALLER ?= uv
ifeq ($(INSTALLER),uv)
  INSTALLER_SETUP := $(PY) -m pip install -q uv
  INSTALL := $(VENV)/bin/uv pip install -q --python $(PY)
else
  INSTALLER_SETUP := $(PY) -m pip install -q --upgrade pip
  INSTALL := $(PY) -m pip install -q
endif
# Bytecode for the modules the stages import, written by importing them once (even where
# PYTHONDONTWRITEBYTECODE is set, as pip writes it at install): without it each stage process here took
# 27 s to import torch, transformers and trl, against 11 s with it.
WARM_IMPORTS := env -u PYTHONDONTWRITEBYTECODE $(PY) -c "import alignpipe.cli, matplotlib.pyplot, peft, \
  datasets; from trl import SFTTrainer, DPOTrainer, RewardTrainer; from transformers import LlamaForCausalLM"
ifeq ($(ACCELERATE),)
  ALIGNPIPE := $(VENV)/bin/alignpipe
else
  ALIGNPIPE := $(VENV)/bin/accelerate launch --config_file $(ACCELERATE) --num_processes $(NPROC) -m alignpipe.cli
endif

.PHONY: install install-test pipeline test test-fast pretrain sft reward dpo ppo grpo report chat bench bench-peers clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, by pip (it finds this machine's CPU wheel; uv does not look there): pinned unless TORCH= says
	# otherwise, or a torch is already there; its bytecode is written below, for what alignpipe imports only
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --no-compile "$(TORCH)"
	$(INSTALLER_SETUP)
	$(INSTALL) -e .
	$(WARM_IMPORTS)
	touch $@

# the tests' own packages (lm-eval, trackers, selenium): only `make test` waits for them
install-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed
	$(INSTALL) -e ".[test]"
	touch $@

# the report is written even when the run fails (a missed gate is shown in it); make still fails then
pipeline: install
	status=0; ALIGNPIPE_THREADS=$(THREADS) $(ALIGNPIPE) run $(RECIPE) --parallel $(PARALLEL) $(ARGS) || status=$$?; \
	$(VENV)/bin/alignpipe report runs/$$($(PY) -c "import yaml,sys; print(yaml.safe_load(open('$(RECIPE)'))['name'])") \
	  || echo "alignpipe report failed (the run's status is unchanged)"; \
	exit $$status

# one pytest worker per usable core, at most 4 (each trains on one torch thread; a test file stays on one worker,
# so its module fixtures are built once); the 25 slowest tests are listed at the end: where the suite's minutes go
TEST_WORKERS ?= -n auto --maxprocesses 4 --dist loadfile
test: install-test
	$(PY) -m pytest tests $(TEST_WORKERS) --durations=25 $(ARGS)

# the tests that train no model (pytest marker `slow` on the others): seconds, not the suite's minutes
test-fast: install-test
	$(PY) -m pytest tests -m "not slow" $(TEST_WORKERS) $(ARGS)

pretrain sft reward dpo ppo grpo: install
	$(ALIGNPIPE) run $(RECIPE) --stages $@ $(ARGS)

report: install
	$(VENV)/bin/alignpipe report runs/$$($(PY) -c "import yaml; print(yaml.safe_load(open('$(RECIPE)'))['name'])")

STAGE ?= sft
chat: install
	$(VENV)/bin/alignpipe chat runs/$$($(PY) -c "import yaml; print(yaml.safe_load(open('$(RECIPE)'))['name'])")/$(STAGE)

bench: install
	$(PY) -m benchmarks.run $(ARGS)

# LLaMA-Factory 0.9.5 in a venv of its own, for the bench's lf_* contestants (same work as ours, same run).
# torch pinned to our CPU wheel. PyPI's torchvision/torchaudio do not load beside torch 2.13 (built for
# other torch versions) and break transformers' imports; text training needs neither, so they go
# (`pip check` then lists them as missing; benchmarks/lf_contestant.py stands in an empty torchaudio).
LF_VENV ?= .venv-llamafactory
bench-peers: $(LF_VENV)/.installed

$(LF_VENV)/.installed:
	test -x $(LF_VENV)/bin/python || $(PYTHON) -m venv $(LF_VENV)
	$(LF_VENV)/bin/python -m pip install -q --upgrade pip
	$(LF_VENV)/bin/python -m pip install -q "$(TORCH)" "llamafactory==0.9.5"
	$(LF_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio
	touch $@

clean:
	rm -rf runs benchmarks/out .pytest_cache
