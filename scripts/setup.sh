#!/usr/bin/env bash
# Creates .venv with torch 2.13.0 (CPU wheel, installed first so nothing pulls a CUDA build),
# then this checkout in editable mode (distribution torch-probes, import name probes) with the dev extra:
# tests, lint, the docs extra (mkdocs, Material, mkdocstrings) and the release tools (build, twine).
# Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
V=.venv/bin/python
if ! $V -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  $V -m pip install -q "torch==2.13.0"
fi
# a venv made before the rename holds this checkout under its old distribution name, probes
if $V -m pip show probes 2>/dev/null | grep -qx "Editable project location: $PWD"; then
  $V -m pip uninstall -q -y probes
fi
$V -m pip install -q -e ".[dev]"
# guard: the extras must not have replaced torch
$V -c 'import torch, sys; v = torch.__version__; print("torch", v); sys.exit(0 if v.startswith("2.13.0") else 1)'
