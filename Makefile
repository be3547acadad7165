# Everything a fresh machine needs is set up by these targets: the virtual
# environment in .venv, the Python packages, and (on first use) the Kafka
# broker's jars from Maven Central, cached under ~/.cache/strata.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: all venv demo test lint unit bench soak broker-up broker-down clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The peers benchmarks compare against (Quix Streams, confluent-kafka) are
# installed only for `make bench`.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

venv: $(STAMP)

## The main job on real input: the chatterbot corpus through a real broker.
demo: venv
	$(BIN)/strata demo

## Lint, type-check, then every test against a real broker.
test: lint
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## Only the tests that need no broker.
unit: venv
	$(BIN)/pytest -q -m 'not broker'

## Benchmarks against the raw aiokafka client, same topic, same run.
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench

## Long crash loops (50 kills), beyond what CI runs.
soak: venv
	$(BIN)/pytest -q -m soak -o addopts=''

broker-up: venv
	$(BIN)/strata broker up

broker-down: venv
	$(BIN)/strata broker down

clean:
	-$(BIN)/strata broker down
	rm -rf .strata .pytest_cache .mypy_cache .ruff_cache
