# nanoshard — the common commands. Each target creates and fills .venv when needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: demo test lint format typecheck protos gpt2-bpe bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nanoshard demo

gpt2-bpe: $(STAMP)
	$(BIN)/python scripts/fetch_gpt2_bpe.py

# A worker per core and one more: the multi-process tests spend a third of their time waiting
# on the processes they start (2 cores ran 67 % busy with two workers, 90 % with three). An idle
# worker takes tests from the end of another's queue (conftest.py puts short ones last).
WORKERS ?= $(shell echo $$(( $$(nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 1) + 1 )))
# The 15 slowest tests are listed at the end: the suite must stay under 12 minutes here.
test: $(STAMP) gpt2-bpe
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist worksteal --durations=15

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: $(STAMP)
	$(BIN)/mypy nanoshard node coordinator client cli api

# Regenerate the Python code of protos/ into nanoshard/v1 (committed; a test checks it is fresh).
protos: $(STAMP)
	$(BIN)/python scripts/protogen.py

# Benchmarks write JSON + Markdown (+ plots) under benchmarks/results/; suite.md holds every
# performance target against its measurement (numbers in the README).
bench: $(STAMP) gpt2-bpe
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/suite.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache .mypy_cache
