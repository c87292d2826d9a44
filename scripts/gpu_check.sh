#!/usr/bin/env bash
# The GPU check (docs/BENCHMARKS.md, "GPU"): on a CUDA machine that starts bare, with torch (CUDA),
# onnx and onnxruntime installed and nothing fetched, in at most 5 minutes:
#   1. the `gpu` tests (tests/test_gpu.py);
#   2. bench/efrap_gpu.py on ResNet-18 at 32x32, 1,024 images, w4a4, at the release's settings
#      (10,000 iterations per layer), then at the default and fast presets.
# What it needs that such a machine lacks travels in .gpu/ (made here by scripts/gpu_prepare.sh):
# the wheels of onnx-graphsurgeon (and anything else listed there) and the Fashion-MNIST files.
# Results go to $OUT (or gpu-out/): the logs and each bench run's JSON. A smoke test of the script
# itself without a GPU: EFRAP_GPU_DEVICE=cpu EFRAP_GPU_ITERS=2 EFRAP_GPU_IMAGES=64 (the gpu tests
# then fail, as they must without CUDA).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 EFRAP_FASHION_MNIST_DIR="$PWD/.gpu/fashion-mnist"
if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .gpu/site .gpu/wheels/*.whl || exit 2
  export PYTHONPATH="$PWD/.gpu/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))" \
  | tee "$OUT/device.txt"
status=0
DEVICE=${EFRAP_GPU_DEVICE:-cuda}
ITERS=()
[ -n "${EFRAP_GPU_ITERS:-}" ] && ITERS=(--iters "$EFRAP_GPU_ITERS")
IMAGES=${EFRAP_GPU_IMAGES:-1024}
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" || status=1
# Seconds per preset: the goal is 60 s for the release's settings on one H100, less for the others.
for run in release:150 default:45 fast:30; do
  preset=${run%%:*}
  timeout "${run##*:}" python3 bench/efrap_gpu.py --arch resnet18 --preset "$preset" "${ITERS[@]}" \
    --num-calib "$IMAGES" --scheme w4a4 --device "$DEVICE" --json "$OUT/efrap_gpu_$preset.json" 2>&1 \
    | tee "$OUT/efrap_gpu_$preset.log" || status=1
done
exit $status
