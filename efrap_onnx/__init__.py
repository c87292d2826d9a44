"""efrap-onnx's public Python API: one import path, whatever the layout underneath.

    from efrap_onnx import quantize_static  # was: from onnxruntime.quantization import ...
    from efrap_onnx import defend, scan, verify

The code lives in the top-level packages `pipeline`, `models`, `converters` and
`validators` (the project's layout); this module re-exports what users call. The names
load on first use, so that `pipeline` can import `efrap_onnx.packages` at its own start
without pulling in torch, and the first use checks that those four packages are
efrap-onnx's (`efrap_onnx.packages`: a shadowed one raises `ShadowedPackageError`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from efrap_onnx.packages import ShadowedPackageError, check_packages

#: Public name -> the module that defines it.
_EXPORTS = {
    "__version__": "pipeline",
    "quantize_static": "pipeline.api",
    "defend": "pipeline.api",
    "scan": "pipeline.api",
    "verify": "pipeline.api",
    "DefendResult": "pipeline.api",
    "Deployment": "pipeline.base.deployment",
    "EfrapError": "pipeline.base.errors",
    "load_model": "pipeline.base.onnx_io",
    "save_model": "pipeline.base.onnx_io",
    "QuantizeOptions": "pipeline.quantize",
    "QuantizeSummary": "pipeline.quantize",
    "GuardOptions": "pipeline.quantize",
    "calibration_images": "pipeline.quantize",
    "quantize_file": "pipeline.quantize",
    "quantize_model": "pipeline.quantize",
    "ScanReport": "pipeline.scan",
    "Scheme": "pipeline.base.scheme",
    "load_scheme": "pipeline.base.scheme",
    "simulate_logits": "pipeline.torch_graph",
    "Reference": "validators.verify",
    "VerifyOptions": "validators.verify",
    "VerifyReport": "validators.verify",
    "verify_model": "validators.verify",
}

__all__ = [  # the public names: `_EXPORTS` and the package check
    "DefendResult",
    "Deployment",
    "EfrapError",
    "GuardOptions",
    "QuantizeOptions",
    "QuantizeSummary",
    "Reference",
    "ScanReport",
    "Scheme",
    "ShadowedPackageError",
    "VerifyOptions",
    "VerifyReport",
    "__version__",
    "calibration_images",
    "check_packages",
    "defend",
    "load_model",
    "load_scheme",
    "quantize_file",
    "quantize_model",
    "quantize_static",
    "save_model",
    "scan",
    "simulate_logits",
    "verify",
    "verify_model",
]

if TYPE_CHECKING:  # what type checkers and editors see; at run time `__getattr__` loads them
    from pipeline.api import DefendResult, defend, quantize_static, scan, verify
    from pipeline.base.deployment import Deployment
    from pipeline.base.errors import EfrapError
    from pipeline.base.onnx_io import load_model, save_model
    from pipeline.base.scheme import Scheme, load_scheme
    from pipeline.quantize import (
        GuardOptions,
        QuantizeOptions,
        QuantizeSummary,
        calibration_images,
        quantize_file,
        quantize_model,
    )
    from pipeline.scan import ScanReport
    from pipeline.torch_graph import simulate_logits
    from validators.verify import Reference, VerifyOptions, VerifyReport, verify_model


def __getattr__(name: str) -> object:
    """Load public name `name` from its module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'efrap_onnx' has no attribute {name!r}")
    check_packages()
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later uses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
