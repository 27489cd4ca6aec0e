# The two commands a new machine needs:  `make run`  (the main job)  and  `make test`.
# Both install what is missing first: a virtualenv with the project, then the services'
# binaries (PostgreSQL 15 with apt, Kafka jars with Maven, Azurite with npm, Toxiproxy with go)
# and Prometheus with apt (promtool and prometheus, for the tests of the alert rules).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install prometheus run test lint stack-up stack-down

install: $(VENV)/.installed
	$(BIN)/replicator dev install
	@$(MAKE) --no-print-directory prometheus

# Debian's `prometheus` package (as root; otherwise say what to run). The tests start their
# own Prometheus on a free port: the system service the package may start is stopped and
# disabled.
prometheus:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "promtool is missing: run 'sudo apt-get install --no-install-recommends prometheus'" >&2; \
	    exit 1; \
	  fi; \
	  apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus && \
	  if [ -d /run/systemd/system ]; then systemctl disable --now prometheus || true; \
	  else service prometheus stop >/dev/null 2>&1 || true; fi; \
	fi

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
