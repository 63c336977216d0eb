# vllm-gateway: the two commands that matter are `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test bench lint clean dashboards

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/vllm-gateway serve $(if $(CONFIG),--config $(CONFIG))

test: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run_bench.py

lint: $(STAMP)
	$(BIN)/ruff check .

dashboards: $(STAMP)
	$(BIN)/python dashboards/generate.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
