# The README's two commands: `make demo` (xenpool's main job) and `make test` (the whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo demo-qemu test lint bootstrap clean

bootstrap:
	@./scripts/bootstrap.sh

demo: bootstrap
	@$(VENV)/bin/xenpool demo

# Real guests (QEMU without KVM, NBD disks) on three hosts in network namespaces; root.
demo-qemu: bootstrap
	@$(VENV)/bin/xenpool demo --qemu

# Lint first: a style or type error fails the build before the nine-minute suite runs.
lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: bootstrap lint
	@rm -f .coverage .coverage.*
	$(PY) -m coverage run -m pytest $(PYTEST_ARGS)
	@$(PY) -m coverage combine -q 2>/dev/null || true
	$(PY) -m coverage report

clean:
	rm -rf $(VENV) .coverage .coverage.* .pytest_cache .hypothesis build *.egg-info
