#!/usr/bin/env bash
# Run on a machine WITH network: downloads into scripts/gpu-check/wheels/ every wheel the
# gateway needs (pyproject.toml's dependencies, resolved, plus setuptools and wheel for the
# editable install), for Linux x86_64 and CPython 3.11-3.13, so that gpu-check.sh can
# install offline on a GPU host. The bundle is built on demand and not committed.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=scripts/gpu-check/wheels
PY=${PYTHON:-python3}
VERSIONS=${GPU_CHECK_PY_VERSIONS:-"3.11 3.12 3.13"}

mkdir -p "$DEST"
REQS=$(mktemp)
trap 'rm -f "$REQS"' EXIT
"$PY" - "$REQS" <<'PYEOF'
import sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
open(sys.argv[1], "w").write("\n".join(deps + ["setuptools>=68", "wheel"]) + "\n")
PYEOF
PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
for v in $VERSIONS; do
  echo "bundle: CPython $v"
  "$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: \
    --implementation cp --python-version "$v" "${PLATFORMS[@]}" -d "$DEST" -r "$REQS"
done
echo "bundle: $(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
