"""Converters: torch -> ONNX export and QDQ rewriting."""

__efrap_onnx__ = True  # efrap_onnx.packages checks for this line: the package is efrap-onnx's
