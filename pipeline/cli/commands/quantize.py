"""`efrap quantize`: FP ONNX -> QDQ ONNX with a chosen rounding method."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.base.data import spec_files
from pipeline.base.device import DEVICES
from pipeline.base.onnx_io import model_files
from pipeline.base.safe_io import check_outputs, write_json
from pipeline.base.scheme import scheme_files
from pipeline.cli.args import (
    add_data_arg,
    add_exclude_arg,
    add_preprocess_args,
    add_scheme_arg,
    fraction,
    lower_limit,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    seed_number,
    upper_limit,
)
from pipeline.cli.spec import release_spec
from pipeline.quantize import QuantizeSummary
from pipeline.release_spec import ReleaseSpec
from pipeline.rounding import METHODS, EfrapConfig
from pipeline.rounding.base import ERROR_MODES, ERROR_UNITS, LOSS_NAMES, SAMPLES
from pipeline.rounding.settings import OVERRIDABLE
from pipeline.runner import defend_step
from validators.guard import GuardReport


def add_common_quant_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by `quantize` and `defend`."""
    p.add_argument("model", help="full-precision ONNX model")
    p.add_argument("-o", "--output", required=True, help="where to write the QDQ ONNX model")
    add_scheme_arg(p)
    add_data_arg(p, note="; only --min-accuracy needs labels")
    p.add_argument("--num-calib", type=positive_int, default=1024,
                   help="calibration images (default 1024; where the data hold fewer, all of them, with "
                   "a warning)")
    p.add_argument("--seed", type=seed_number, default=0,
                   help="the run's one seed: calibration images, value sampling, learned "
                   "rounding's batches (default 0)")
    p.add_argument("--weight-storage", choices=("int8", "int4"), default="int8",
                   help="int8 containers (fast on CPU) or packed int4 (small); default int8")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="torch device for learned rounding (default: CUDA when available)")
    p.add_argument("--json", "--summary", dest="json",
                   help="also write the run's report as JSON here: per-layer stats and the check against FP "
                   "(--summary is the same option)")
    p.add_argument("--no-resume", action="store_true",
                   help="neither use nor keep the per-layer checkpoint OUTPUT.ckpt that lets a killed "
                   "run with learned rounding or pruning resume from its last finished layer")
    add_exclude_arg(p)
    add_preprocess_args(p)
    add_check_args(p)


def add_check_args(p: argparse.ArgumentParser) -> None:
    """The output's check against FP (every run measures it; the limits make it fail)."""
    g = p.add_argument_group(
        "check (every output is measured against FP; exit 1 when it breaks a limit given here, and "
        "the model is still written, its metadata and --json saying why)",
        "The output and the FP model run in onnxruntime on held-out training images that "
        "calibration did not use: top-1 agreement for a classifier's logits, relative error "
        "||q - fp|| / ||fp|| for every output, clean accuracy with labels. Fractions (0.01) or "
        "percentages (1%).")
    g.add_argument("--holdout", type=positive_int, default=1000, help="held-out images (default 1000)")
    g.add_argument("--max-agreement-drop", type=upper_limit,
                   help="largest share of held-out images whose prediction may differ from FP's")
    g.add_argument("--min-accuracy", type=lower_limit,
                   help="lowest clean accuracy on the held-out images (needs labelled data)")
    g.add_argument("--max-output-error", type=nonnegative_float,
                   help="largest relative error of any output against FP (e.g. 0.05; the figure of "
                   "detectors, segmenters and embedders)")
    g.add_argument("--check-opt-level", choices=("faithful", "all"), default="faithful",
                   help="onnxruntime optimization level of the check (default faithful)")


def _rounding_help(defaults: EfrapConfig) -> dict[str, tuple[dict, str]]:
    """argparse settings and help of each rounding option, by settings field (EFRAP's have them all)."""
    d = defaults
    return {
        "iters": ({"type": positive_int}, f"iterations per layer (default {d.iters}); fewer is faster"),
        "batch_size": ({"type": positive_int}, f"samples per iteration (default {d.batch_size})"),
        "lr": ({"type": positive_float}, f"Adam learning rate (default {d.lr:g})"),
        "reg_weight": ({"type": nonnegative_float},
                       f"rounding regulariser weight (default {d.reg_weight:g})"),
        "b_start": ({"type": positive_float}, "regulariser exponent at the end of warm-up, annealed to "
                    f"--b-end (default {d.b_start:g})"),
        "b_end": ({"type": positive_float}, f"final regulariser exponent (default {d.b_end:g})"),
        "warmup": ({"type": nonnegative_float}, "share of the iterations without the regulariser, below 1 "
                   f"(default {d.warmup:g})"),
        "flip_weight": ({"type": nonnegative_float},
                        f"EFRAP flip penalty weight (default {d.flip_weight:g})"),
        "error_mode": ({"choices": ERROR_MODES}, "truncation-error weighting: element-wise (the release) "
                       f"or the output channel's norm (default {d.error_mode})"),
        "loss": ({"choices": LOSS_NAMES}, f"activation-preservation loss (default {d.loss})"),
        "error_units": ({"choices": tuple(u.replace("_", "-") for u in ERROR_UNITS)},
                        "units of EFRAP's truncation errors: pre-bn (the release: the conv weight before "
                        "BatchNorm folding, when the model records its BN factors), exported (the folded "
                        "weight) or steps (grid steps: the same at any weight scale) (default "
                        f"{d.error_units.replace('_', '-')})"),
        "act_lr": ({"type": nonnegative_float}, "learn each layer's output activation step size at this "
                   "rate (the release's scale_lr 4e-5, cosine decay); 0 keeps the calibrated one (default "
                   f"{d.act_lr:g})"),
        "rec_guard": ({"type": nonnegative_float}, "EFRAP's per-layer guard: round a layer again with half "
                      "the flip weight (up to 3 times) while its reconstruction loss exceeds this many times "
                      f"nearest rounding's; 0 is off (default {d.rec_guard:g})"),
        "prune_rare": ({"type": fraction, "metavar": "SHARE"}, "rare-unit pruning, any method: zero the "
                       "weights reading the input units that fire on the fewest calibration images, "
                       "together on at most this share of them (a fraction, or a percentage: 3%%; "
                       f"docs/DEFENSE.md); 0 is off (default {d.prune_rare:g})"),
        "samples": ({"choices": SAMPLES}, "each step's batch: whole cached images (the release) or rows "
                    "of (image, position) pairs from every calibration image, for 2-D convs (default "
                    f"{d.samples})"),
        "pool": ({"type": positive_int},
                 f"rows of each layer's pool with --samples positions (default {d.pool})"),
        "patience": ({"type": nonnegative_int}, "stop a layer once its hard rounding has not changed over "
                     f"this many checks in the second half of its steps; 0 runs every step (default "
                     f"{d.patience})"),
    }


def add_rounding_args(p: argparse.ArgumentParser, defaults: EfrapConfig) -> None:
    """One option per field of any method's settings (`pipeline.rounding.settings.OVERRIDABLE`).

    A method is given only its own (`method_settings` refuses the others): nearest and qvec
    take --prune-rare alone."""
    g = p.add_argument_group("learned rounding (adaround, efrap, lac: each takes its own settings; "
                             "--prune-rare with any method)")
    helps = _rounding_help(defaults)
    for name in OVERRIDABLE:
        kwargs, text = helps[name]
        g.add_argument(f"--{name.replace('_', '-')}", default=None, help=text, **kwargs)


def rounding_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The rounding options that were given, as settings fields."""
    given = {f: getattr(args, f) for f in OVERRIDABLE if getattr(args, f, None) is not None}
    if "error_units" in given:
        given["error_units"] = str(given["error_units"]).replace("-", "_")
    return given


def print_summary(summary: QuantizeSummary, output: str) -> None:
    """One line per layer, then where the model went."""
    for layer in summary.layers:
        pruned = (f"  pruned {int(layer.stats['pruned_units'])} input units "
                  f"({100 * layer.stats.get('pruned_fraction', 0.0):.2f}% of weights)"
                  if layer.stats.get("pruned_units") else "")
        print(f"  {layer.layer:<28} {layer.op:<6} {layer.bits}-bit  "
              f"flipped {100 * layer.flip_fraction:6.2f}%  {layer.seconds:.1f}s{pruned}")
    for line in summary.search.lines() if summary.search is not None else ():
        print(line)
    if summary.resumed:
        print(f"resumed: {summary.resumed} of {len(summary.layers)} layers restored from the checkpoint "
              "(their seconds are those of the run that computed them)")
    print(f"wrote {output} ({summary.options.method}, scheme {summary.options.scheme.name}, seed "
          f"{summary.options.seed}, calibration {summary.calibration_seconds:.1f}s, rounding "
          f"{summary.rounding_seconds:.1f}s)")
    if summary.unpacked_four_bit:
        print(four_bit_hint(summary.unpacked_four_bit, output))


def four_bit_hint(weights: int, output: str) -> str:
    """The one line saying that 4-bit weights sit in int8 containers and how much packing saves."""
    saved = weights // 2
    size = Path(output).stat().st_size if Path(output).is_file() else 0
    share = f", {100 * saved / size:.0f}% of this file" if size else ""
    return (f"note: this file stores its {weights:,} 4-bit weights in int8 containers, one byte each; "
            f"--weight-storage int4 packs two to a byte, about {_size(saved)} smaller{share} "
            "(int8 containers run faster on CPU)")


def _size(n: int) -> str:
    """A byte count for people: "870 B", "28.5 KiB", "1.8 MiB"."""
    if n < 1024:
        return f"{n} B"
    if n < 1 << 20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1 << 20):.1f} MiB"


def print_guard(report: GuardReport, limits: bool = True) -> None:
    """The output's check against FP: its figures, the verdict when limits were set, and why
    it failed; each output's fidelity when there is more than a classifier's logits."""
    verdict = f": {'PASSED' if report.passed else 'FAILED'}" if limits else ""
    if report.fidelity is None:
        print(f"check: nothing measured ({report.note}){verdict}")
    else:
        acc = (f", clean accuracy {100 * report.accuracy:.2f}% (FP {100 * report.fp_accuracy:.2f}%)"
               if report.accuracy is not None and report.fp_accuracy is not None else "")
        agree = "" if report.agreement is None else f"agreement with FP {100 * report.agreement:.2f}%, "
        error = "n/a" if report.output_error is None else f"{report.output_error:.4g}"
        print(f"check: {agree}relative output error {error} on {report.images} held-out images{acc} "
              f"(onnxruntime {report.provider}, opt level {report.opt_level}){verdict}")
        if len(report.fidelity.outputs) > 1 or report.agreement is None:
            for line in report.fidelity.lines():
                print(f"check:   {line}")
    for why in report.why:
        print(f"check: {why}")


def quantize_spec(args: argparse.Namespace, method: str, preset: str | None = None) -> ReleaseSpec:
    """The run's spec from the arguments, after checking that no output overwrites an input."""
    check_outputs({"-o": args.output, "--json": args.json},
                  [*model_files(args.model), *scheme_files(args.scheme), *spec_files(args.calib),
                   *([args.preprocess] if args.preprocess else [])])
    return release_spec(args, method, preset, rounding_overrides(args))


def quantize_with(args: argparse.Namespace, method: str, preset: str | None = None) -> int:
    """Quantize `args.model` with `method` (settings: EFRAP's `preset` or the method's defaults,
    overridden by the options given), check it against FP, print the per-layer summary and
    the check, write outputs.

    Returns:
        0, or 1 when the output broke a limit of its check (the model and the summary
        are written either way, and say why).
    """
    spec = quantize_spec(args, method, preset)
    guard = spec.guard_options()
    defended = defend_step(Path(args.model), Path(args.output), spec.quantize_options(), guard,
                           resume=not args.no_resume)
    summary, report = defended.summary, defended.guard
    print_summary(summary, args.output)
    print_guard(report, guard.limits.any)
    if args.json:
        write_json({**summary.to_json(), "guard": report.to_json()}, args.json)
    return 0 if report.passed else 1


def run(args: argparse.Namespace) -> int:
    """Quantize with the chosen method."""
    return quantize_with(args, args.method)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `efrap quantize`."""
    p = sub.add_parser("quantize", help="quantize an FP ONNX model into QDQ ONNX",
                       description="Calibrate in onnxruntime, round weights with the chosen "
                       "method, and write QDQ ONNX (integer weights feeding DequantizeLinear).")
    add_common_quant_args(p)
    p.add_argument("--method", default="nearest", choices=tuple(METHODS),
                   help=f"rounding method: {', '.join(METHODS)} (default nearest; qvec chooses its "
                   "scale on held-out training images, docs/DEFENSE.md \"QVec\")")
    # EFRAP's field defaults (the release's, the calibrated output step size kept).
    add_rounding_args(p, EfrapConfig())
    p.set_defaults(func=run)
