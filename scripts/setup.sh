#!/usr/bin/env bash
# Set up efrap-onnx on a fresh Debian machine: the Fashion-MNIST data set, the CPU build of
# PyTorch (installed first, so no multi-GB CUDA build is pulled), and the package itself.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

if ! ls /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte* >/dev/null 2>&1; then
  echo "setup: installing the Fashion-MNIST data set (Debian package dataset-fashion-mnist)"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY=${PYTHON:-python3}
if ! $PY -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing PyTorch 2.13.0 (CPU)"
  $PY -m pip install -q torch==2.13.0
fi
# tests/test_wheel.py installs the built wheel into a fresh virtual environment (venv with pip).
if ! $PY -c "import ensurepip, venv" >/dev/null 2>&1; then
  echo "setup: installing python3-venv (Debian), for the wheel test's virtual environment"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq python3-venv >/dev/null
fi
echo "setup: installing efrap-onnx with its dev extra"
$PY -m pip install -q -e ".[dev]"
# pyenv only sees new console scripts (efrap) after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
echo "setup: done ($($PY -c 'import torch, onnxruntime; print("torch", torch.__version__, "onnxruntime", onnxruntime.__version__)'))"
