# The two commands a newcomer runs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU-only machines.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[train,dev]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py seed_demo
	$(PY) manage.py seed_release_demo
	$(PY) infra/run_local.py --host $(HOST) --port $(PORT)

# A worker per CPU (pytest-xdist), each taking whole files so a module's fixtures are built once; the slowest tests
# named, to keep the suite within its ~10 minutes.
test: install
	$(PY) -m pytest -n logical --dist loadfile --durations=15

bench: install
	$(PY) tests/bench/registry_api.py
	$(PY) tests/bench/train_throughput.py
	$(PY) tests/bench/generate.py
	$(PY) tests/bench/download.py  # needs nginx (apt-get install nginx)
	$(PY) tests/bench/load.py  # the production-like stack under load: needs PostgreSQL, Redis, nginx

clean:
	rm -rf var
