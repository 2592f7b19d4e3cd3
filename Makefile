# rpserver: `make run` serves on http://127.0.0.1:8888, `make test` runs the suite
# (`make test-postgres`: on PostgreSQL).
# Both create .venv and install everything on a fresh machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8888
HOST ?= 127.0.0.1
MODEL ?=
STRATEGY ?= auto
# The browser tests drive this Chromium (scripts/ensure-chromium installs Debian's).
CHROMIUM ?= /usr/bin/chromium
export CHROMIUM

.PHONY: install run test test-postgres bench clean

install: $(VENV)/.installed $(VENV)/.kernels

# torch is installed first and pinned: an unpinned torch pulls gigabytes of CUDA packages.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

# The compiled CPU kernels (inference/kernels, ~2 min on 2 cores with a C++ compiler). Without
# one the build fails, says so, and rpserver uses its TorchScript fallback.
$(VENV)/.kernels: $(VENV)/.installed inference/kernels/wkv7.cpp inference/kernels/int8_linear.cpp inference/kernels/f32_linear.cpp inference/kernels/time_mix.cpp inference/kernels/sampling.cpp inference/kernels/products.h inference/kernels/avx2.h inference/kernels/__init__.py
	-$(PY) -m inference.kernels
	touch $@

run: install
	$(PY) manage.py collectstatic --noinput --verbosity 0
	$(PY) manage.py serve --host $(HOST) --port $(PORT) --strategy "$(STRATEGY)" $(if $(MODEL),--model "$(MODEL)")

test: install tests/node_modules/axe-core/axe.min.js
	scripts/ensure-chromium
	$(PY) -m pytest

# The suite on a private PostgreSQL server the run starts itself (tests/postgres.py);
# the files whose outcome does not depend on the database are reported as deselected.
test-postgres: install tests/node_modules/axe-core/axe.min.js
	scripts/ensure-chromium
	RPSERVER_TEST_DATABASE=postgres $(PY) -m pytest

# axe-core for the browser tests' accessibility check, at the version tests/package-lock.json pins (npm).
tests/node_modules/axe-core/axe.min.js: tests/package.json tests/package-lock.json
	npm ci --prefix tests --no-audit --no-fund --silent
	touch $@

bench: install
	$(PY) bench/forward.py
	$(PY) bench/throughput.py
	$(PY) bench/resume.py

clean:
	rm -rf $(VENV) staticfiles .pytest_cache
