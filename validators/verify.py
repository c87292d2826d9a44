"""Run a model in onnxruntime on test data: clean accuracy, attack success, parity.

The deployed model is the truth: every figure comes from onnxruntime, and the
report names the optimization level and provider it ran at, the data, the model's
sha256 and the normalisation. This layer needs only onnxruntime and the base layer;
a parity reference (the pipeline's PyTorch simulation) is passed in by the caller.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from pipeline.base import data as data_mod
from pipeline.base.deployment import Deployment, DeploymentViews
from pipeline.base.errors import EfrapError, NotSupported
from pipeline.base.onnx_io import META_PREFIX, check_logits, get_metadata, image_input, load_model
from pipeline.base.preprocess import resolve
from pipeline.base.provenance import versions
from pipeline.base.runtime import make_session
from pipeline.base.safe_io import file_sha256
from pipeline.base.trigger import AnyTrigger, load_trigger
from validators.limits import LimitsResult, VerifyLimits
from validators.metrics import (
    AttackSuccess,
    Parity,
    accuracy,
    attack_success,
    prediction_parity,
    why_not_measurable,
)


@dataclass(frozen=True)
class Reference:
    """A second computation of the same model's logits to compare against.

    Attributes:
        name: What it is ("pytorch simulation").
        logits: (model, preprocessed inputs) -> logits; raises NotSupported when it
            does not cover the model.
    """

    name: str
    logits: Callable[[onnx.ModelProto, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class VerifyOptions(DeploymentViews):
    """Settings of one verification.

    Attributes:
        deployment: The settings every step shares, checked there; verification reads its
            data set's test split, its onnxruntime optimization level and provider, its seed
            (the choice of the `limit` images) and preprocessing (no scheme needed).
        trigger: Trigger file or object, or None for clean accuracy only.
        reference: Also compare with this reference computation.
        limit: Use only N test images, chosen at random with the seed (None: all).
        gate: Thresholds that make the report pass or fail.
    """

    deployment: Deployment = field(default_factory=Deployment)
    trigger: str | AnyTrigger | None = None
    reference: Reference | None = None
    limit: int | None = None
    gate: VerifyLimits = field(default_factory=VerifyLimits)

    def __post_init__(self) -> None:
        if not isinstance(self.deployment, Deployment):
            raise EfrapError(f"deployment must be a Deployment, got {self.deployment!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise EfrapError(f"--limit must be a positive number of images, got {self.limit}")


@dataclass(frozen=True)
class VerifyReport:
    """Everything one verification measured, and what it was measured on.

    A figure that was asked for but could not be measured is None, and
    `not_measurable` says why, by figure ("accuracy", "asr", "parity").
    """

    model: str
    model_sha256: str
    data: str
    split: str
    images: int
    image_choice: str
    opt_level: str
    provider: str
    preprocessing: dict
    clean_accuracy: float | None
    attack: AttackSuccess | None
    trigger: dict | None
    parity: Parity | None
    gate: LimitsResult | None
    seconds: float
    model_metadata: dict[str, str]
    versions: dict[str, str]
    not_measurable: dict[str, str] = field(default_factory=dict)

    @property
    def attack_success_rate(self) -> float | None:
        """Attack success on non-target images (None without a trigger or such images)."""
        return self.attack.rate if self.attack is not None else None

    def to_json(self) -> dict:
        """JSON-ready dict (the `efrap verify --json` file)."""
        out = asdict(self)
        out["attack_success_rate"] = self.attack_success_rate
        out["attack_success_rate_all"] = self.attack.rate_all if self.attack else None
        return out


def _pick(dataset: data_mod.Dataset, limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    if limit is None or limit >= len(dataset.labels):
        return dataset.images, dataset.labels, "all"
    # A random subset, not the first N: a split sorted by class would give one class.
    idx = data_mod.sample_indices(len(dataset.labels), limit, seed)
    return dataset.take(idx), dataset.labels[idx], f"{limit} chosen at random with seed {seed}"


def verify_model(model_path: str, options: VerifyOptions) -> VerifyReport:
    """Measure a model file in onnxruntime.

    Raises:
        EfrapError: unreadable model or data, data that does not fit the model,
            labels or a trigger target the model has no class for, model-ready arrays
            instead of images, images without labels, or a model quantized from
            model-ready arrays that records no preprocessing of raw images when none is given.
    """
    model = load_model(model_path)
    image = image_input(model, model_path)
    check_logits(model, model_path)
    trigger = load_trigger(options.trigger) if isinstance(options.trigger, str) else options.trigger
    if data_mod.model_inputs(options.data, image.name) is not None:
        # Arrays already preprocessed would be preprocessed again (or not at all) unnoticed.
        raise EfrapError(f"{options.data}: holds model-ready arrays ('{image.name}', no labels); verify "
                         "takes labelled images in [0, 1] (x/y or x_test/y_test) and preprocesses them "
                         "as the model records")
    norm = resolve(model, image, options.preprocess, model_path, announce=False)
    dataset = data_mod.load_dataset(options.data, "test", norm.resize)
    data_mod.check_fits(dataset, norm.nchw_shape(image), model_path)
    # The preprocessing's warnings once the data are read: a mistake in them is one line alone.
    resolve(model, image, options.preprocess, model_path)
    images, labels, choice = _pick(dataset, options.limit, options.seed)
    session = make_session(model, options.opt_level, options.provider)
    t0 = time.perf_counter()
    clean_in = norm.apply(images)
    logits = session.run(clean_in, desc=f"verify: {model_path} on clean test images")
    if logits.ndim != 2:
        raise EfrapError(f"{model_path}: output has shape {logits.shape}; expected batch x classes")
    classes = logits.shape[1]
    if int(labels.max()) >= classes:
        raise EfrapError(f"{options.data}: label {int(labels.max())} is not a class of this model "
                         f"({classes} classes)")
    missing: dict[str, str] = {}
    if why := why_not_measurable(logits, "test"):
        missing["accuracy"] = why
    attack = None
    if trigger is None:
        missing["asr"] = "no trigger given"
    else:
        if trigger.target >= classes:
            raise EfrapError(f"trigger target {trigger.target} is not a class of this model "
                             f"({classes} classes)")
        triggered = session.run(norm.apply(trigger.apply(images)),
                                desc=f"verify: {model_path} on triggered test images")
        attack = attack_success(triggered, labels, trigger.target)
        if why := why_not_measurable(triggered, "triggered"):
            missing["asr"] = why
        elif attack.rate is None:
            missing["asr"] = (f"no test image outside the target class {trigger.target} was "
                              f"measured ({len(labels)} images, all of class {trigger.target})")
    parity = None
    if options.reference is not None:
        try:
            parity = prediction_parity(logits, options.reference.logits(model, clean_in),
                                       options.reference.name)
        except NotSupported as exc:
            parity = Parity(options.reference.name, None, None, why=str(exc))
    if parity is None:
        missing["parity"] = "no reference asked for (--reference)"
    elif parity.why:
        missing["parity"] = parity.why
    seconds = round(time.perf_counter() - t0, 3)
    acc = accuracy(logits, labels)
    gate = None
    if options.gate.active:
        gate = options.gate.evaluate(acc, attack.rate if attack else None,
                                     parity.fraction_differing_predictions if parity else None,
                                     missing)
    meta = get_metadata(model)
    return VerifyReport(
        model=str(model_path), model_sha256=file_sha256(model_path), data=options.data,
        split="test", images=len(labels), image_choice=choice, opt_level=options.opt_level,
        provider=session.provider, preprocessing=norm.to_json(), clean_accuracy=acc,
        attack=attack, trigger=trigger.to_json() if trigger is not None else None, parity=parity,
        gate=gate, seconds=seconds,
        model_metadata={k: v for k, v in meta.items() if k.startswith(META_PREFIX)},
        versions=versions(),
        not_measurable={key: why for key, why in missing.items() if key == "accuracy"
                        or (key == "asr" and trigger is not None)
                        or (key == "parity" and options.reference is not None)},
    )
