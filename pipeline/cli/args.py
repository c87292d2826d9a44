"""Argument types and the parser class of the command line.

Every number from the command line is checked where it is parsed: plain ASCII
decimal digits (never "0.0_1" or non-ASCII digits), finite, in range, of the right
kind. Every count option is capped by `COUNT_CAPS` (the caps of `pipeline.base.limits`,
the same as in gate configs and batch manifests), checked by `Parser` right after
parsing, before any command runs. A parse error is one line (`efrap CMD: error: ...`),
exit 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from pipeline.base import checks, limits
from pipeline.base.data import DEFAULT_DATA
from pipeline.base.errors import EfrapError, one_line
from pipeline.base.preprocess import CHANNEL_ORDERS, LAYOUTS, from_table
from pipeline.base.scheme import DEFAULT_SCHEME, PRESETS

#: The cap of every count option, by its name: any command that takes the option gets the
#: same cap (`Parser` checks it after parsing), and gate configs and batch manifests read
#: the same `limits` caps for the same counts.
COUNT_CAPS: dict[str, limits.Cap] = {
    "--iters": limits.ITERS,
    "--num-calib": limits.IMAGES,
    "--holdout": limits.IMAGES,
    "--limit": limits.IMAGES,
    "--train-limit": limits.IMAGES,
    "--max-targets": limits.TARGETS,
    "--batch-size": limits.BATCH,
    "--pool": limits.POOL,
    "--patience": limits.PATIENCE,
    "--epochs": limits.EPOCHS,
    "--pretrain-epochs": limits.PRETRAIN_EPOCHS,
    "--steps-per-epoch": limits.STEPS,
    "--jobs": limits.WORKERS,
    "--threads": limits.WORKERS,
    "--seed": limits.SEED,
}
#: The data specs that serve calibration (pipeline.base.data), for --help: labels optional.
CALIB_SPECS = ("fashion-mnist, mnist:PATH, cifar10:PATH, imagefolder:PATH (PATH/train/<class>/*.png, or "
               "image files directly in PATH: no labels), npz:FILE (x_train with or without y_train, x with "
               "or without y, or a single array)")
#: The data specs of labelled test images, for --help.
TEST_SPECS = ("fashion-mnist, mnist:PATH, cifar10:PATH, imagefolder:PATH (PATH/test/<class>/*.png), "
              "npz:FILE (x_test and y_test, or x and y)")
#: Where one command counts something else under the same option: the scan's calibration
#: images (a gate config's scan.num_calib has the same cap).
COMMAND_CAPS: dict[str, dict[str, limits.Cap]] = {
    "scan": {"--num-calib": limits.SCAN_CALIB},
    "audit": {"--num-calib": limits.SCAN_CALIB},
}


def check_counts(args: argparse.Namespace, command: str | None = None) -> None:
    """Refuse any count option outside its cap (`COUNT_CAPS`, then `COMMAND_CAPS[command]`).

    Raises:
        EfrapError: the first option out of range, named as on the command line.
    """
    for option, cap in {**COUNT_CAPS, **COMMAND_CAPS.get(command or "", {})}.items():
        value = getattr(args, option[2:].replace("-", "_"), None)
        if value is not None:
            cap.check(value, f"argument {option}")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2, and whose --help
    ends with `glossary` as it is written (its line breaks kept)."""

    glossary: str = ""

    def format_help(self) -> str:
        """argparse's help, then the glossary."""
        text = super().format_help()
        return f"{text}\n{self.glossary}\n" if self.glossary else text

    def error(self, message: str) -> NoReturn:
        """Print `efrap CMD: error: MESSAGE` (one line) and exit 2."""
        print(f"{self.prog}: error: {one_line(message)}", file=sys.stderr)
        sys.exit(2)

    def parse_known_args(self, args: list[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        """Parse, then check every count against its cap (before any command runs)."""
        parsed, extra = super().parse_known_args(args, namespace)
        # A sub-command's parser is "efrap CMD"; the top one knows the command from its namespace.
        command = self.prog.split()[-1] if " " in self.prog else getattr(parsed, "command", None)
        try:
            check_counts(parsed, command)
        except EfrapError as exc:
            self.error(str(exc))
        return parsed, extra


def _number(kind: type, low: float | None, low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = checks.integer_text(text) if kind is int else checks.number_text(text)
        except EfrapError:
            if kind is float and text.strip().lower() in ("inf", "+inf", "-inf", "nan", "infinity"):
                raise argparse.ArgumentTypeError(f"'{text}' is not finite") from None
            raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if kind is int else 'a number'}"
                                             " in plain decimal digits") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"'{text}' is not finite")
        if low is not None and (value <= low if low_open else value < low):
            bound = "above" if low_open else "at least"
            raise argparse.ArgumentTypeError(f"'{text}' must be {bound} {low:g}")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = _number(int, 1)
nonnegative_int = _number(int, 0)
positive_float = _number(float, 0.0, low_open=True)
nonnegative_float = _number(float, 0.0)

#: Largest seed: torch, numpy and the seed derivation all take a 63-bit integer.
MAX_SEED = limits.SEED.high
#: Widest width multiplier of an architecture (beyond it a model does not fit in memory).
MAX_WIDTH = 16.0


def seed_number(text: str) -> int:
    """A seed: an integer in [0, 2**63 - 1]."""
    value = int(nonnegative_int(text))
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"'{text}' is larger than the largest seed, 2**63 - 1")
    return value


def width_factor(text: str) -> float:
    """A width multiplier: a number in (0, MAX_WIDTH]."""
    value = positive_float(text)
    if value > MAX_WIDTH:
        raise argparse.ArgumentTypeError(f"'{text}' is wider than {MAX_WIDTH:g} times the base model")
    return value


def above_one(text: str) -> float:
    """A finite number above 1."""
    return _number(float, 1.0, low_open=True)(text)


def fraction(text: str) -> float:
    """A threshold: a fraction in [0, 1] (0.05) or a percentage (5%)."""
    try:
        return checks.fraction(text)
    except EfrapError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _limit(text: str, useless: float) -> float:
    value = fraction(text)
    if value == useless:
        hint = " (a bare number is a fraction: 1 means 100%; for one percent write 1%)" \
            if useless == 1.0 and not text.strip().endswith("%") else ""
        raise argparse.ArgumentTypeError(f"'{text}' lets every model pass; a gate must be able to "
                                         f"fail{hint}")
    return value


def upper_limit(text: str) -> float:
    """A gate's highest acceptable fraction: `fraction`, but never 1 (100%), which passes all."""
    return _limit(text, 1.0)


def lower_limit(text: str) -> float:
    """A gate's lowest acceptable fraction: `fraction`, but never 0, which passes all."""
    return _limit(text, 0.0)


def _floats(text: str) -> list[float]:
    try:
        values = [checks.number_text(v) for v in text.replace(" ", "").split(",") if v]
    except EfrapError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"'{text}' must list finite numbers")
    return values


def _size(text: str) -> list[int]:
    parts = text.lower().split("x")
    try:
        values = [checks.integer_text(p) for p in parts]
    except EfrapError:
        raise argparse.ArgumentTypeError(f"'{text}' is not HEIGHTxWIDTH (e.g. 48x192)") from None
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not HEIGHTxWIDTH (e.g. 48x192)")
    return values


def add_preprocess_args(p: argparse.ArgumentParser) -> None:
    """Options for models that record no preprocessing (they override what the model records)."""
    g = p.add_argument_group(
        "preprocessing", "How images in [0, 1] become the model's input: resize, scale, channel "
        "order, (x - mean) / std, layout. Default: what the model's metadata records; a model "
        "without any gets mean 0, std 1 and a warning.")
    g.add_argument("--preprocess", metavar="FILE",
                   help="a TOML/JSON file with these settings (a [preprocess] table or top-level keys: "
                   "mean, std, input_scale, channel_order, layout, resize); options below override it")
    g.add_argument("--mean", type=_floats, help="per-channel mean, comma-separated (e.g. 0.485,0.456,0.406)")
    g.add_argument("--std", type=_floats, help="per-channel std, comma-separated")
    g.add_argument("--input-scale", type=positive_float,
                   help="multiply [0, 1] pixels by this first (255 for models that take 0-255)")
    g.add_argument("--channel-order", choices=CHANNEL_ORDERS, help="rgb or bgr")
    g.add_argument("--layout", choices=LAYOUTS, help="the input's layout (default: from its shape)")
    g.add_argument("--resize", type=_size, metavar="HxW",
                   help="resize images to HEIGHTxWIDTH first (an image folder of mixed sizes needs it: "
                   "each image is resized as it is read)")


def preprocess_options(args: argparse.Namespace) -> dict | None:
    """Checked preprocessing fields from --preprocess FILE and the options (None: none given)."""
    table: dict = {}
    if args.preprocess:
        data = checks.load_config(args.preprocess, "preprocess")
        if isinstance(data, dict) and "preprocess" in data:
            data = data["preprocess"]
        table.update(from_table(data, args.preprocess))
    given = {"mean": args.mean, "std": args.std, "input_scale": args.input_scale,
             "channel_order": args.channel_order, "layout": args.layout, "resize": args.resize}
    table.update(from_table({k: v for k, v in given.items() if v is not None}, "command line"))
    return table or None


def add_exclude_arg(p: argparse.ArgumentParser) -> None:
    """--exclude: layers kept in float, by node name or op type (onnxruntime's nodes_to_exclude)."""
    p.add_argument("--exclude", action="append", default=[], metavar="NAME_OR_OP",
                   help="keep this node (by name) or every node of this op type in float; repeat or "
                   "separate with commas (e.g. --exclude /features.0/Conv --exclude Gemm)")


def exclusions(args: argparse.Namespace) -> tuple[str, ...]:
    """The --exclude values, split on commas."""
    return tuple(v for item in args.exclude for v in item.split(",") if v)


def add_scheme_arg(p: argparse.ArgumentParser, what: str = "the deployment's quantization scheme") -> None:
    """--scheme, with the one default of every command (`pipeline.base.scheme.DEFAULT_SCHEME`)."""
    p.add_argument("--scheme", default=DEFAULT_SCHEME,
                   help=f"{what}: preset ({', '.join(PRESETS)}) or a .json/.toml scheme file "
                   f"(default {DEFAULT_SCHEME})")


def add_data_arg(p: argparse.ArgumentParser, split: str = "train", note: str = "") -> None:
    """--data (the data set; --calib is the same option where its training split is read).

    Args:
        p: The command's parser.
        split: "train" for commands that calibrate, check or scan on the training split
            (they also take --calib), "test" for verification.
        note: A sentence about labels, appended to the help.
    """
    if split == "train":
        p.add_argument("--data", "--calib", dest="calib", default=DEFAULT_DATA, metavar="DATA",
                       help=f"the data set; its training split is read (default {DEFAULT_DATA}; --calib is "
                       f"the same option): {CALIB_SPECS}{note}")
    else:
        p.add_argument("--data", default=DEFAULT_DATA, metavar="DATA",
                       help=f"the data set; its labelled test split is read (default {DEFAULT_DATA}): "
                       f"{TEST_SPECS}{note}")
