# editkit: `make figures` regenerates every figure, `make test` runs the test suite.
# Both create .venv themselves. TORCH_SPEC pins the CPU wheel available on the
# project's build machines; GPU users: `make figures TORCH_SPEC=torch` (or install
# the CUDA wheel of their choice into .venv first).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.editkit-installed

.PHONY: venv test figures notebook browser-test bench world clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

venv: $(STAMP)

# -rs: say why each skipped test was skipped
test: $(STAMP)
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

figures: $(STAMP)
	$(VENV)/bin/editkit figures $(if $(QUICK),--quick,)

# One notebook with other parameters, e.g.
#   make notebook NB=layer_sweep ARGS='-p n_edits 100 -p methods ROME,MEMIT'
#   make notebook NB=layer_sweep ARGS='--help-notebook'      (its parameters and types)
notebook: $(STAMP)
	@test -n "$(NB)" || { echo "usage: make notebook NB=layer_sweep ARGS='-p n_edits 100'"; exit 2; }
	$(VENV)/bin/editkit run $(NB) $(if $(QUICK),--quick,) $(ARGS)

# The widgets in a real JupyterLab, driven by Playwright with the system Chromium
# (install it first: `apt-get install chromium`; Playwright's own browser download is not used).
UI_STAMP := $(VENV)/.editkit-ui-installed
$(UI_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,ui]"
	touch $(UI_STAMP)

browser-test: $(UI_STAMP)
	$(PY) -m pytest -q -rs -m browser tests/test_browser.py $(PYTEST_ARGS)

world: $(STAMP)
	$(VENV)/bin/editkit world build

bench: $(STAMP)
	$(PY) benchmarks/run.py $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) runs .pytest_cache
