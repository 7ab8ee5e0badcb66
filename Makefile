# The two commands (see README): `make pipeline` and `make test`.
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup pipeline test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

PROFILE ?= tiny
pipeline: setup
	python flows/idlm_full.py --profile $(PROFILE)

test: setup
	bash scripts/test_services.sh
	OMP_NUM_THREADS=1 python -m pytest -q -n 2

lint: setup
	ruff check src stages tests bench flows

clean:
	rm -rf outputs
