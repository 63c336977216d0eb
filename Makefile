# vllm-gateway: the two commands that matter are `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
TINY_MODEL := .cache/tiny-models/tiny-llama/config.json

# LiteLLM's proxy, the streaming bench's peer (a separate venv of about 750 MB). Pinned:
# 1.106.12 is the newest whose [proxy] extra installs here (later ones need litellm-proxy /
# litellm-proxy-extras releases the package index does not have); bump it deliberately.
LITELLM_VERSION := 1.106.12
LITELLM_VENV := .venv-litellm
LITELLM_STAMP := $(LITELLM_VENV)/.installed-$(LITELLM_VERSION)

.PHONY: install run test test-vllm vllm bench litellm lint clean dashboards

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/vllm-gateway serve $(if $(CONFIG),--config $(CONFIG))

# vLLM's CPU build (about 3.4 GB, a separate venv) and the tiny model its tests serve.
$(VLLM_STAMP): scripts/vllm-venv.sh scripts/vllm-dist-shim/pyproject.toml
	bash scripts/vllm-venv.sh $(VLLM_VENV)
	touch $@

$(TINY_MODEL): $(VLLM_STAMP) scripts/build_tiny_models.py
	$(VLLM_VENV)/bin/python scripts/build_tiny_models.py .cache/tiny-models
	touch $@

vllm: $(VLLM_STAMP) $(TINY_MODEL)

test: $(STAMP) vllm
	$(BIN)/pytest -q --durations=20 $(PYTEST_ARGS)

test-vllm: $(STAMP) vllm
	$(BIN)/pytest -q -m real_vllm $(PYTEST_ARGS)

$(LITELLM_STAMP):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(LITELLM_VENV)/bin/python || $(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install -q --upgrade pip
	$(LITELLM_VENV)/bin/pip install -q 'litellm[proxy]==$(LITELLM_VERSION)'
	rm -f $(LITELLM_VENV)/.installed-*
	touch $@

litellm: $(LITELLM_STAMP)

# bench/README.md: request overhead (wrk), then streaming (direct, bare relay, gateway, LiteLLM)
bench: $(STAMP) $(LITELLM_STAMP)
	$(BIN)/python bench/run_bench.py
	$(BIN)/python bench/stream_bench.py

lint: $(STAMP)
	$(BIN)/ruff check .

dashboards: $(STAMP)
	$(BIN)/python dashboards/generate.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LITELLM_VENV) .cache build *.egg-info .pytest_cache

.PHONY: gpu-check
gpu-check:  # GPU memory check on a GPU host: scripts/gpu-check/README.md
	bash scripts/gpu-check.sh $(GPU_CHECK_ARGS)
