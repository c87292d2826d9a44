"""Plain-text tables for the terminal."""

from __future__ import annotations

from collections.abc import Sequence


def pct(value: float | None, missing: str = "-", *, digits: int = 2, unit: str = "%") -> str:
    """A fraction as a percentage, or `missing`.

    Args:
        value: The fraction (0.1234 -> "12.34%"), or None when there is none.
        missing: What None prints as.
        digits: Decimals shown.
        unit: What follows the number: "" where a table's header already says "percent".
    """
    return missing if value is None else f"{100.0 * value:.{digits}f}{unit}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A left-aligned text table with a header rule."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
