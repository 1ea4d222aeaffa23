#!/usr/bin/env bash
# One-time setup for bench/fetch.py: img2dataset in its own virtual environment, because it pins old
# pandas/webdataset/fsspec versions that cannot live beside the project's. Idempotent; prints the venv's python.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${IMG2DATASET_VENV:-.venv-img2dataset}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x "$VENV/bin/img2dataset" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "img2dataset==1.47.0"
fi
"$VENV/bin/python" -c "import img2dataset" >&2
echo "$PWD/$VENV/bin/python"
