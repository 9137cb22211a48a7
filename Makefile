# Two commands: `make demo` and `make test`. Each sets up .venv itself on a fresh machine.
# `make test-vllm` / `make test-sglang` also set up that engine in its own venv (.venv-vllm, .venv-sglang:
# several GB each, their torch/Transformers pins differ from ours) and run fp8vl's checks with the
# engine's own loader on the CPU. Point VLLM_VENV / SGLANG_VENV at an existing venv to reuse it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fp8vl-installed
LOCK   := constraints.txt
# `make test-latest`: the suite against the newest releases pip resolves today (drift seen before it bites)
LATEST := .venv-latest

VLLM_VERSION   ?= 0.33.0
SGLANG_VERSION ?= 0.5.23
VLLM_VENV      ?= .venv-vllm
SGLANG_VENV    ?= .venv-sglang

.PHONY: demo test test-latest lock test-vllm test-sglang bench venv clean

venv: $(STAMP)

# exactly the locked versions (constraints.txt), whatever is newer on the index today
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip
	$(PY) -m pip install -q -c $(LOCK) -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fp8vl demo --workdir demo-out

test: $(STAMP)
	$(PY) -m pytest -q

# the newest releases of everything (no lock), in a venv of their own, made anew each time
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q -e '.[test]'
	$(LATEST)/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|triton|safetensors|huggingface.hub|compressed.tensors)=='
	$(LATEST)/bin/python -m pytest -q

# re-resolve the lock on purpose: the newest releases, frozen into constraints.txt (then run make test)
lock:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q -e '.[test]'
	{ sed -n '1,2p' $(LOCK); $(LATEST)/bin/python -m pip freeze --all --exclude-editable | grep -vE '^(setuptools|wheel)=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

$(VLLM_VENV)/.fp8vl-vllm-$(VLLM_VERSION):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q 'vllm==$(VLLM_VERSION)'
	touch $@

$(SGLANG_VENV)/.fp8vl-sglang-$(SGLANG_VERSION):
	$(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/python -m pip install -q 'sglang==$(SGLANG_VERSION)'
	touch $@

test-vllm: $(STAMP) $(VLLM_VENV)/.fp8vl-vllm-$(VLLM_VERSION)
	FP8VL_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PY) -m pytest -q tests/check/test_vllm_check.py

test-sglang: $(STAMP) $(SGLANG_VENV)/.fp8vl-sglang-$(SGLANG_VERSION)
	FP8VL_SGLANG_PYTHON=$(abspath $(SGLANG_VENV))/bin/python $(PY) -m pytest -q tests/check/test_sglang_check.py

bench: $(STAMP)
	$(PY) benchmarks/convert.py

clean:
	rm -rf demo-out bench-out .pytest_cache $(LATEST)
