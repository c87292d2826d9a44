"""One seed per run; every random choice takes a sub-seed derived from it by purpose.

`derive(seed, "calibration-images")` and `derive(seed, "rounding", layer)` are stable
across runs, platforms and versions (a hash, not Python's randomised `hash`), so the
same seed reproduces the same images, samples and batches wherever the run starts:
the library, `efrap quantize`, `efrap defend` and `efrap demo` all agree.
"""

from __future__ import annotations

import hashlib


def derive(seed: int, *purpose: str) -> int:
    """A 32-bit sub-seed of `seed` for `purpose` (e.g. "rounding", layer name)."""
    text = ":".join([str(int(seed)), *purpose])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
