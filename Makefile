# persona_pipeline: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PERSONA_HOME ?= $(CURDIR)/.persona
DAGSTER_HOME ?= $(PERSONA_HOME)/dagster
export PERSONA_HOME DAGSTER_HOME
DEV_PORT ?= 3000
INSTALLED := $(VENV)/.installed
# Test files spread over two processes; a file's tests (and its module fixtures) stay together.
PYTEST_PARALLEL ?= -n 2 --dist loadfile

.PHONY: install demo test lint format dev validate migrate clean bench bench-curve bench-engines

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(INSTALLED)

demo: $(INSTALLED)  ## generate a demo fleet (if the landing zone is empty), run the whole loop, compare the weights
	$(BIN)/persona-pipeline generate --if-empty
	$(BIN)/persona-pipeline demo

test: $(INSTALLED)  ## lint, then the test suite with the persona store on SQLite and on PostgreSQL
	$(BIN)/ruff check .
	$(BIN)/pytest --store sqlite $(PYTEST_PARALLEL)
	$(BIN)/pytest --store postgresql $(PYTEST_PARALLEL)

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(INSTALLED)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

validate: $(INSTALLED)  ## load the code location the way the UI does
	$(BIN)/persona-pipeline init >/dev/null
	$(BIN)/dagster definitions validate -w workspace.yaml

# The UI and the daemon, as `dagster dev` starts them, without its two warnings on every start:
# the command itself is superseded, and this checkout's root dagster.yaml (the template `init`
# copies into DAGSTER_HOME) is not DAGSTER_HOME's. Ctrl-C stops both.
dev: $(INSTALLED)  ## Dagster UI + daemon on 127.0.0.1:$(DEV_PORT), same instance as `make demo`
	$(BIN)/persona-pipeline init
	$(BIN)/dagster-daemon run -w workspace.yaml & daemon=$$!; \
		trap 'kill $$daemon 2>/dev/null' EXIT INT TERM; \
		$(BIN)/dagster-webserver -w workspace.yaml -h 127.0.0.1 -p $(DEV_PORT)

migrate: $(INSTALLED)  ## create or upgrade the persona store's schema (PERSONA_DB_URL, default SQLite)
	$(BIN)/persona-pipeline migrate

# Benchmark sizes and options: `make bench DEVICES=100000 REPEATS=3`,
# `make bench-curve REPEATS=3 LARGE_REPEATS=1`; see benchmarks/README.md.
DEVICES ?= 10000
CURVE_DEVICES ?= 10000 100000 1000000
REPEATS ?= 1
INDEX_SAMPLE ?= 0
BENCH_WORK ?= .bench
BENCH_ARGS ?=
BENCH := $(BIN)/python -m benchmarks --repeats $(REPEATS) --index-sample $(INDEX_SAMPLE) --work $(BENCH_WORK) $(BENCH_ARGS)

bench: $(INSTALLED)  ## one fleet size through every stage, the naive baseline and Dagster: one table
	$(BENCH) --devices $(DEVICES)

bench-curve: $(INSTALLED)  ## the same table at 10k, 100k and 1M devices, and how each stage's cost grows
	$(BENCH) --devices $(CURVE_DEVICES) $(if $(LARGE_REPEATS),--large-repeats $(LARGE_REPEATS))

bench-engines: $(INSTALLED)  ## pandas, DuckDB and Polars on one day's updates: read, type, latest per key
	$(BIN)/python -m pip install --quiet -e '.[dev,engines]'
	$(BIN)/python -m benchmarks.engines --devices $(DEVICES) --repeats $(REPEATS) --work $(BENCH_WORK)/engines

clean:  ## remove the demo home (landing zone, stores, Dagster runs); keeps the virtualenv
	rm -rf $(PERSONA_HOME)
