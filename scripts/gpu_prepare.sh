#!/usr/bin/env bash
# Make .gpu/ (git-ignored) for scripts/gpu_check.sh: the Fashion-MNIST files and the wheels a bare
# CUDA machine (Python 3.12, torch, onnx, onnxruntime, numpy, ml_dtypes, pillow, matplotlib
# installed) lacks: onnx-graphsurgeon. Run here, where the package registry is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/wheels .gpu/fashion-mnist
cp "${EFRAP_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"/*-ubyte* .gpu/fashion-mnist/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .gpu/wheels "onnx-graphsurgeon>=0.5"
du -sh .gpu
