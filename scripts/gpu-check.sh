#!/usr/bin/env bash
# One call on a GPU host without vLLM or network: make the gateway importable, then run
# scripts/gpu-check/check.py (GPU memory: NVML probe, learned footprints, LRU eviction).
# Exit status: check.py's (0 pass, 1 fail, 77 no GPU here), 2 setup failed, 124 timed out.
# Arguments go to check.py (--dry-run, --device N, --keep). See scripts/gpu-check/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${GPU_CHECK_VENV:-scripts/gpu-check/.venv}
WHEELS=${GPU_CHECK_WHEELS:-scripts/gpu-check/wheels}
case $VENV in /*) ;; *) VENV=$PWD/$VENV ;; esac
say() { echo "gpu-check: $*"; }

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { say "need Python >= 3.11 as \$PYTHON (got $("$PY" -V 2>&1))"; exit 2; }
HOST_PY=$("$PY" -c 'import sys; print(sys.executable)')

# 1. A venv over the host's packages (torch, pynvml, aiohttp). When the host python is
#    itself a venv, --system-site-packages reaches only its base, so add the venv's
#    site-packages by a .pth file.
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV (system site packages of $HOST_PY)"
  "$PY" -m venv --system-site-packages "$VENV" 2>/dev/null \
    || "$PY" -m venv --system-site-packages --without-pip "$VENV" \
    || { say "cannot create a venv with $PY"; exit 2; }
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$PY" -c 'import site, sys; sys.prefix != sys.base_prefix and print("\n".join(site.getsitepackages()))' \
    >"$SITE/_gpu_check_host_site.pth"
fi
if "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  PIP=("$VENV/bin/python" -m pip)
else
  PIP=("$PY" -m pip --python "$VENV/bin/python")  # a venv made without ensurepip
fi

# 2. The gateway (editable) and what the host lacks: from the wheel bundle, else online.
if ! (cd / && "$VENV/bin/python" -c 'import gateway.app, vllm_gateway_plugins.nvml_vram' 2>/dev/null); then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    say "installing from the wheel bundle $WHEELS (offline)"
    SOURCE=(--no-index --find-links "$WHEELS")
  elif "$PY" -c 'import urllib.request as u; u.urlopen("https://pypi.org/simple/sanic/", timeout=5)' 2>/dev/null; then
    say "no wheel bundle; installing from the network"
    SOURCE=()
  else
    say "no wheel bundle at $WHEELS and no network: run scripts/gpu-check/bundle.sh where there is network, and bring $WHEELS along"
    exit 2
  fi
  timeout 300 "${PIP[@]}" install -q --disable-pip-version-check "${SOURCE[@]}" -e . \
    || { say "installing the gateway failed"; exit 2; }
fi

# 3. The check, bounded; hold_gpu.py runs on the host python, where torch surely imports.
export GPU_CHECK_HOLD_PYTHON=$HOST_PY PYTHONUNBUFFERED=1
timeout -k 20 "${GPU_CHECK_TIMEOUT:-300}" "$VENV/bin/python" scripts/gpu-check/check.py "$@"
rc=$?
case $rc in
  0) say "all checks passed" ;;
  77) say "no GPU here: nothing was checked" ;;
  124|137) say "timed out after ${GPU_CHECK_TIMEOUT:-300}s" ;;
  *) say "some checks failed (exit $rc)" ;;
esac
exit $rc
