# callcast — the two commands of the quick start are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: demo test test-fast lint measure bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,fast,bench]'
	touch $(STAMP)

## make demo: install into .venv (first time), run the shop on the embedded broker at :8000
demo: $(STAMP)
	@echo "The shop runs at http://$(HOST):$(PORT) on the embedded broker (sqlite:///.callcast/broker.db)."
	@echo "Try, in another terminal:"
	@echo "  curl -s -XPOST $(HOST):$(PORT)/users -H 'content-type: application/json' -d '{\"name\":\"Ann\",\"email\":\"ann@example.com\"}'"
	@echo "  curl -s '$(HOST):$(PORT)/emails?to=ann@example.com'"
	@echo "  curl -s -XPOST $(HOST):$(PORT)/orders -H 'content-type: application/json' -d '{\"user_id\":\"<id>\",\"items\":[{\"sku\":\"apple\",\"qty\":2}]}'"
	@echo "  curl -s $(HOST):$(PORT)/orders/<order id>      # pending, then confirmed (or rejected: try sku fig, qty 5)"
	@echo "  curl -s $(HOST):$(PORT)/inventory"
	@echo "  $(BIN)/callcast topology examples.shop:app"
	@echo "Ctrl-C stops it cleanly."
	$(BIN)/callcast run examples.shop:app --host $(HOST) --port $(PORT)

## make test: install into .venv (first time), run the whole test suite
test: $(STAMP)
	$(BIN)/python -m pytest

## make test-fast: skip the multi-process and fault tests
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m 'not slow'

## make lint: ruff and mypy --strict
lint: $(STAMP)
	$(BIN)/ruff check src tests examples scripts bench
	$(BIN)/ruff format --check src tests examples scripts bench
	$(BIN)/mypy

## make measure: the figures of the core issue (signup→email latency, orders, kill -9 during signups)
measure: $(STAMP)
	$(BIN)/python scripts/measure_core.py

## make bench: callcast next to the raw clients and FastStream (≤ 15 min; `python -m bench --quick` ~2 min)
bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .callcast .pytest_cache .mypy_cache .ruff_cache
