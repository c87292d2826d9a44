"""The caps on every count a user gives: one definition each, for every way in.

A count from outside (the command line, a gate config, a batch manifest) is checked
against its cap where it enters, before any work starts, so a typo like
``iters = 1000000000000`` is refused in one line instead of running until killed.
The command line (`pipeline.cli.args`), the gate config (`pipeline.gate.config`) and
the batch manifest (`pipeline.batch.manifest`) all read the caps from here, so one
value is accepted or refused the same way wherever it is written: the scan's
calibration images, for one, are `SCAN_CALIB` in ``efrap scan``/``efrap audit``, a
gate's ``scan.num_calib`` and a manifest's ``num_calib`` while its scan is on.

A time budget (seconds) is a limit, not work: a larger one only stops later, so it is
checked finite and positive everywhere, with no upper cap.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.base.errors import EfrapError


@dataclass(frozen=True)
class Cap:
    """The accepted range of one kind of count.

    Attributes:
        what: What is counted, for messages ("iterations per layer").
        low: Smallest accepted value.
        high: Largest accepted value.
    """

    what: str
    low: int
    high: int

    def check(self, value: object, where: str) -> int:
        """`value` if it is an int (not a bool) in [low, high], else EfrapError naming `where`."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise EfrapError(f"{where} must be an integer, got {value!r}")
        if value < self.low:
            raise EfrapError(f"{where} must be at least {self.low:,}, got {value:,}")
        if value > self.high:
            raise EfrapError(f"{where} must be at most {self.high:,} ({self.what}), got {value:,}")
        return value


#: Optimisation steps per layer of learned rounding (the release uses 10,000).
ITERS = Cap("iterations per layer", 1, 1_000_000)
#: Images any count names: calibration, held-out, test images, a training subset.
#: The largest common data set (ImageNet's training split) has 1.28 million.
IMAGES = Cap("images", 1, 10_000_000)
#: Calibration images of the scan (a quarter checks the triggers; it needs a few of each).
SCAN_CALIB = Cap("scan calibration images", 8, IMAGES.high)
#: Classes the scan searches: its outlier test compares at least three.
TARGETS = Cap("classes searched", 3, 100_000)
#: Samples per optimisation step (learned rounding, training).
BATCH = Cap("samples per step", 1, 65_536)
#: Training or attack epochs.
EPOCHS = Cap("epochs", 1, 10_000)
#: Pre-training epochs before an attack (0: start from the initial weights).
PRETRAIN_EPOCHS = Cap("pre-training epochs", 0, EPOCHS.high)
#: Steps of one training epoch, or steps of a rounding-only attack.
STEPS = Cap("steps", 1, 10_000_000)
#: Models run side by side, or threads per model.
WORKERS = Cap("workers", 1, 1024)
#: Rows of a layer's pool of (image, position) samples (learned rounding's "positions").
POOL = Cap("rows of a layer's sample pool", 1, 1 << 22)
#: Unchanged checks before a layer stops early (one check every 1% of its steps).
PATIENCE = Cap("unchanged checks before a layer stops", 0, 100)
#: Seeds: torch, numpy and the seed derivation all take a 63-bit integer.
SEED = Cap("seed", 0, 2**63 - 1)
