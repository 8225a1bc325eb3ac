# The two commands of the README: `make demo` and `make test`. Both install into .venv/ first.
# `make check` is the quick loop: lint and the tests that need no services (see the markers in pyproject.toml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test check lint stack-start stack-stop stack-status bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch and torchvision first, the exact pair known to work together (see README).
	$(PY) -m pip install -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m pipelines.demo

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

check: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -m "not stack and not cluster and not browser and not slow"

lint: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

stack-start: install
	$(PY) -m infra.local start

stack-stop: install
	$(PY) -m infra.local stop

stack-status: install
	$(PY) -m infra.local status

clean:
	-$(PY) -m infra.local stop
	rm -rf .stack
