"""Models: architectures, the red-team attack zoo and the stored model zoo."""

__efrap_onnx__ = True  # efrap_onnx.packages checks for this line: the package is efrap-onnx's
