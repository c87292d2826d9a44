"""Give freed heap memory back to the system between the stages of a long run.

glibc's malloc keeps freed blocks in its heap for reuse, and a heap fragmented by many
activation-sized tensors (megabytes each, freed in a different order than allocated)
stays resident: a scan at 224 x 224 then carries the high-water mark of one stage into
the next. `trim` asks the allocator to return what it can (`malloc_trim(0)`); where the C
library has no such call (not glibc), it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_LIBC_NAME = ctypes.util.find_library("c")
try:
    _TRIM = ctypes.CDLL(_LIBC_NAME).malloc_trim if _LIBC_NAME else None
except (OSError, AttributeError):
    _TRIM = None


def trim() -> bool:
    """Return freed heap memory to the system; whether the C library could be asked."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
