# Everyday commands. Every target creates or reuses .venv at the repository root.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch and torchvision first, pinned as a pair that imports together: PyPI's torchvision is
# built against one torch release and dies at import beside another ('torchvision::nms does not
# exist'). The project's own `torch>=` requirement is then already met when `pip install -e` runs.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-fast bench scorecard sweep planted-sweep proto rule-catalog examples clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Set up, then lint the bundled example (exits 1: the example has planted defects).
demo: setup
	$(BIN)/gradprobe lint examples/mlp_defects.onnx || test $$? -eq 1

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not training"

bench: setup
	$(BIN)/python bench/probe_overhead.py

scorecard: setup
	$(BIN)/python bench/zoo_scorecard.py

# The real libraries as the corpus (bench/README.md, "Hub sweep"): every timm / torchvision /
# transformers architecture at its default init, exported three ways, linted. Hours on 2 cores;
# resumable. E.g. make sweep SWEEP_ARGS="--sample 30 --export torchscript onnx_dynamo".
SWEEP_ARGS ?=
sweep: setup
	$(BIN)/python bench/hub_sweep.py $(SWEEP_ARGS)

planted-sweep: setup
	$(BIN)/python bench/planted_sweep.py $(PLANTED_ARGS)

proto: setup
	$(BIN)/python scripts/gen_proto.py

rule-catalog: setup
	$(BIN)/python scripts/gen_rule_catalog.py

examples: setup
	$(BIN)/python examples/make_examples.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
