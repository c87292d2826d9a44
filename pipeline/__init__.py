"""efrap-onnx pipeline: CLI, orchestration, calibration, quantization math and EFRAP."""

from efrap_onnx.packages import check_packages

__efrap_onnx__ = True  # efrap_onnx.packages checks for this line: the package is efrap-onnx's
__version__ = "0.1.0"

# Every import of the pipeline (pipeline.api, `python -m pipeline.cli.main`) starts here: stop
# with one clear message when `models`, `converters` or `validators` is another package.
check_packages()
