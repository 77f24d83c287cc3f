# The two commands users run: `make demo` and `make test`. Both bootstrap first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: bootstrap demo test lint types unit bench clean

bootstrap:
	@bash scripts/bootstrap.sh

demo: bootstrap
	@$(PY) -m sealbox.deploy.demo

test: bootstrap lint types unit

lint:
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

types:
	$(VENV)/bin/mypy

unit:
	$(VENV)/bin/pytest -q

bench: bootstrap
	$(PY) -m bench

clean:
	rm -rf $(VENV) .bootstrap-stamp demo build *.egg-info
