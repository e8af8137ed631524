# The two quickstart targets (README.md). `.ci/run` calls `make test`.
PYTHON ?= python
INSTALL = $(PYTHON) -m pip install --quiet --disable-pip-version-check -c constraints/cpu.txt -e ".[dev]"

.PHONY: install demo test lint

install:
	$(INSTALL)

demo: install
	$(PYTHON) -m data_pipelines.demo
	$(PYTHON) launchers/train_vae.py
	$(PYTHON) launchers/train_ldm.py

lint:
	ruff check .
	lint-imports

test: install lint
	$(PYTHON) -m pytest -q
