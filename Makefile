# The two commands a new machine needs:  `make run`  (the main job)  and  `make test`.
# Both install what is missing first: a virtualenv with the project, then the services'
# binaries (PostgreSQL 15 with apt, Kafka jars with Maven, Azurite with npm, Toxiproxy with go).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install run test lint stack-up stack-down

install: $(VENV)/.installed
	$(BIN)/replicator dev install

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Main job on embedded defaults: the local stack, a sample wedding database, capture into
# Kafka and the archive under a live workload, one wedding restored as of a moment in the
# past, verify against the live database, and a summary (`replicator demo`; exit code 1
# when the restore differs or verify fails).
run: install
	$(BIN)/replicator dev up
	$(BIN)/replicator demo

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

# Lint, type-check, then every test against the real services (the fixtures start the stack).
test: install lint
	$(BIN)/python -m pytest

stack-up: install
	$(BIN)/replicator dev up

stack-down:
	$(BIN)/replicator dev down
