"""What a scan reads before any stage: the model, the defended model, the images.

Everything is read and checked whatever the budget, so that a mistake in the model or
the data is always one error line.
"""

from __future__ import annotations

import onnx

from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import check_logits, fixed_batch, image_input, load_model
from pipeline.base.preprocess import PreparedImages
from pipeline.quantize import calibration_images, holdout_images
from pipeline.scan.images import ImageSet
from pipeline.scan.options import ScanOptions
from pipeline.scan.state import Clock, ScanState


def read_inputs(model_path: str, options: ScanOptions, defended: str | None, clock: Clock) -> ScanState:
    """The scan's state before its stages: the checked models and the images in [0, 1].

    Raises:
        EfrapError: unreadable model or data, model-ready arrays, a fixed batch size, a
            defended model that does not match or is not quantized.
    """
    model = load_model(model_path)
    image_input(model, model_path)
    check_logits(model, model_path)
    if fixed_batch(model) is not None:
        raise EfrapError(f"{model_path}: the input has a fixed batch size ({fixed_batch(model)}); the scan "
                         "runs batches of images (export with a dynamic batch)")
    defended_model = load_defended(defended, model, model_path) if defended is not None else None
    # The data are read whatever the budget, so that a mistake in them is always one line.
    images, pre = calibration_images(model, options.calib, options.num_calib, options.seed, model_path,
                                     options.preprocess)
    raw = raw_images(images, options.calib)
    hold, _ = holdout_images(model, options.calib, options.num_calib, options.holdout, options.seed,
                             model_path, options.preprocess)
    return ScanState(options=options, model_path=model_path, model=model, images=images, pre=pre, raw=raw,
                     raw_hold=raw_images(hold, options.calib), clock=clock, classes=static_classes(model),
                     defended_path=defended, defended_model=defended_model)


def raw_images(images: object, what: str) -> ImageSet:
    """Images in [0, 1] behind model-ready inputs (the trigger is stamped before preprocessing)."""
    if not isinstance(images, PreparedImages):
        raise EfrapError(f"{what}: the scan stamps triggers on images in [0, 1] before preprocessing; "
                         "give a data set (fashion-mnist, cifar10:PATH, imagefolder:PATH, ...), not "
                         "model-ready arrays")
    return ImageSet(images.dataset, images.index)


def load_defended(path: str, model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    defended = load_model(path)
    if image_input(defended, path).shape[1:] != image_input(model, source).shape[1:]:
        raise EfrapError(f"{path}: the defended model's input does not match {source}'s")
    check_logits(defended, path)
    if not any(n.op_type == "DequantizeLinear" for n in defended.graph.node):
        raise EfrapError(f"{path}: --defended must be a quantized (QDQ) model, e.g. from efrap defend")
    return defended


def static_classes(model: onnx.ModelProto) -> int:
    """The number of classes the graph's first output declares (0 when it is not a fixed number)."""
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return int(dims[1].dim_value) if len(dims) == 2 and dims[1].HasField("dim_value") else 0
