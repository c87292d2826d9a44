"""Validators: onnxruntime checks, metrics, the gate and reports."""
