# citygate: `make demo` shows the whole system on this machine; `make test` runs every
# test ring that needs no hardware, plus ruff and mypy. Both set themselves up.

PYTHON ?= python3
VENV := .venv
PYCOSE_VENV := .venv-pycose
NODE_RING := tests/micropython
BIN := $(VENV)/bin
DURATION ?= 30
PYTEST_ARGS ?=

.PHONY: all venv system demo test lint typecheck unit clean bench deb hil-long

all: test

system:
	@scripts/ensure-debian-packages.sh

venv: system $(VENV)/.installed $(PYCOSE_VENV)/.installed $(NODE_RING)/node_modules/.package-lock.json

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

# pycose 1.1 needs cbor2<6 while the project uses cbor2 6: an environment of its own
$(PYCOSE_VENV)/.installed: tests/independent/requirements.txt
	$(PYTHON) -m venv $(PYCOSE_VENV)
	$(PYCOSE_VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/independent/requirements.txt
	@touch $@

# the MicroPython WebAssembly port the codec ring runs on, as pinned by its package-lock.json
$(NODE_RING)/node_modules/.package-lock.json: $(NODE_RING)/package-lock.json
	npm ci --prefix $(NODE_RING) --no-audit --no-fund

demo: venv
	$(BIN)/citygate demo --duration $(DURATION)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

# two workers, one test file each at a time (a file's session fixtures are built once)
test: lint typecheck
	$(BIN)/pytest -n 2 --dist loadfile $(PYTEST_ARGS)

# the long variants of the HIL scenarios (hil_tests/README.md), about 30 minutes, with figures
hil-long: venv
	$(BIN)/pytest hil_tests --long -s

bench: venv
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/modbus_poll.py
	$(BIN)/python -m bench.footprint
	$(BIN)/python -m bench.ota

# dist/citygate_<version>_<arch>.deb for this machine's architecture (docs/adr/0004-systemd-sandbox.md)
DEB_PYTHON ?= /usr/bin/python3

deb: system
	$(DEB_PYTHON) -m images.deb --out dist --cache build/deb-cache

clean:
	rm -rf $(VENV) $(PYCOSE_VENV) $(NODE_RING)/node_modules build dist .pytest_cache .mypy_cache .ruff_cache
