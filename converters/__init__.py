"""Converters: torch -> ONNX export and QDQ rewriting."""
