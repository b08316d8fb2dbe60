# Two set-up-free entry points: `make demo` and `make test`. Both create .venv and install
# the project (pinned TVM / tvm-ffi / torch) on first use; later runs reuse it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.attnforge-installed
NPROC  := $(shell nproc 2>/dev/null || echo 2)
export TVM_NUM_THREADS ?= $(NPROC)

.PHONY: install demo test test-slow clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	@$(PY) -c "import tvm, tvm_ffi, torch, attnforge; print('attnforge env ok: tvm', tvm.__version__, 'torch', torch.__version__)"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m attnforge demo

# Default suite: everything not marked slow, two pytest workers.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q -p no:cacheprovider

# Long tests (large shapes, full tuning runs): see README.
test-slow: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m slow

clean:
	rm -rf $(VENV) build *.egg-info
