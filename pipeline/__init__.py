"""efrap-onnx pipeline: CLI, orchestration, calibration, quantization math and EFRAP."""

__version__ = "0.1.0"
