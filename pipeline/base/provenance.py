"""What produced an output: package versions, recorded in models and reports."""

from __future__ import annotations

import platform
from importlib import metadata


def versions() -> dict[str, str]:
    """Versions of Python and the packages that shape the numbers."""
    out = {"python": platform.python_version()}
    for dist in ("efrap-onnx", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy",
                 "onnx-graphsurgeon", "ml_dtypes"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
