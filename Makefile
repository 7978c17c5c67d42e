# Two commands do everything on a fresh machine:
#   make demo   set up, then train on the built-in data, export and profile (no download, no GPU)
#   make test   set up, then run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tmkt-installed

LAVA_ENV ?= $(HOME)/.cache/tmkt/lava-env
SINABS_ENV ?= $(HOME)/.cache/tmkt/nir-sinabs

.PHONY: install lava-env nir-envs demo test bench clean

install: $(STAMP)

# torch is pinned on the same pip line as everything else: this takes the CPU build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 -e '.[dev,neurobench,live]'
	touch $(STAMP)

DEMO := runs/demo

# The main job on the built-in data: train TMKT, evaluate, export to every target, profile energy.
# Reruns retrain into the same folder (--overwrite): the demo's outputs are regenerated each time.
demo: install lava-env
	$(BIN)/tmkt train --out $(DEMO) --overwrite
	$(BIN)/tmkt eval $(DEMO) --per-class
	$(BIN)/tmkt export $(DEMO) --target onnx --out $(DEMO)/model.onnx
	$(BIN)/tmkt export $(DEMO) --target onnx --mode stream --out $(DEMO)/model-stream.onnx
	$(BIN)/tmkt export $(DEMO) --target lava --out $(DEMO)/model.net
	$(BIN)/tmkt eval $(DEMO)/model.net
	$(BIN)/tmkt export $(DEMO) --target onnx --int8 --out $(DEMO)/model-int8.onnx
	$(BIN)/tmkt eval $(DEMO)/model-int8.onnx
	$(BIN)/tmkt export $(DEMO) --target nir --out $(DEMO)/model.nir
	$(BIN)/tmkt profile $(DEMO) --energy --samples 64 --json $(DEMO)/profile.json --plot $(DEMO)/profile.png

# The Python 3.10 lava-dl environment that checks netx exports (light: no torch; cached).
lava-env:
	bash scripts/lava_env.sh $(LAVA_ENV)

# sinabs 3.1.3 pins nir <= 1.0.4: its own light env (torch CPU + sinabs; cached, a stamp makes reruns free)
# in which the tests run tmkt's NIR files through sinabs's import. norse and snntorch run in .venv.
nir-envs:
	bash scripts/nir_env.sh sinabs $(SINABS_ENV)

test: install lava-env nir-envs
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs build dist *.egg-info
