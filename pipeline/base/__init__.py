"""The base layer: errors, safe I/O, data, triggers, progress, onnxruntime sessions, devices.

Nothing here imports from the rest of the project (pipeline's quantization modules,
converters, validators, models, pipeline.cli); everything else may import from here. A test
(tests/test_layers.py) enforces the order.
"""
