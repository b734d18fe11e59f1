# editkit: `make figures` regenerates every figure, `make test` runs the test suite.
# Both create .venv themselves. TORCH_SPEC pins the CPU wheel available on the
# project's build machines; GPU users: `make figures TORCH_SPEC=torch` (or install
# the CUDA wheel of their choice into .venv first).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.editkit-installed

.PHONY: venv test figures quick bench world clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

figures: $(STAMP)
	$(VENV)/bin/editkit figures $(if $(QUICK),--quick,)

world: $(STAMP)
	$(VENV)/bin/editkit world build

bench: $(STAMP)
	$(PY) benchmarks/run.py $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) runs .pytest_cache
