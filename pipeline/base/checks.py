"""Checks of values that come from outside: command-line numbers, config fields, thresholds.

Every value from outside is checked once, where it enters, with its exact type and
range; the error names the value and where it came from. Config fields are typed
strictly: a boolean must be true/false (never the string "false"), an integer must
be an integer (never 8.0), a number must be finite.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.base.errors import EfrapError

#: Deepest nesting accepted in a JSON/TOML config (schemes, triggers, gate configs are flat).
MAX_CONFIG_DEPTH = 16
#: Largest config file read, in bytes.
MAX_CONFIG_BYTES = 1 << 20
#: A plain decimal number in ASCII: Python's float() also takes "0.0_1", "1_000" and
#: non-ASCII digits ("٠.٠١"), which a user would not read as the number they become.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
_NON_FINITE = ("inf", "+inf", "-inf", "infinity", "+infinity", "-infinity", "nan", "+nan", "-nan")


def number_text(text: str, what: str = "value") -> float:
    """A number written as plain ASCII decimal (``0.05``, ``5``, ``1e-3``); EfrapError otherwise.

    NaN and infinities are refused as not finite; digit separators (``0.0_1``),
    non-ASCII digits and spaces inside the number are refused as not a number.
    """
    raw = text.strip()
    if raw.lower() in _NON_FINITE:
        raise EfrapError(f"{what} must be finite, got '{text}'")
    if not _DECIMAL.fullmatch(raw):
        raise EfrapError(f"{what} must be a plain decimal number, got '{text}'")
    value = float(raw)
    if not math.isfinite(value):  # 1e999 overflows to inf
        raise EfrapError(f"{what} must be finite, got '{text}'")
    return value


def integer_text(text: str, what: str = "value") -> int:
    """An integer written as plain ASCII digits (``1024``); EfrapError otherwise (``1_024``, ``8.0``)."""
    raw = text.strip()
    if not _INTEGER.fullmatch(raw):
        raise EfrapError(f"{what} must be an integer written in plain digits, got '{text}'")
    return int(raw)


def fraction(text: str, what: str = "value") -> float:
    """A threshold written as a fraction in [0, 1] (``0.05``) or a percentage (``5%``).

    One rule, no guessing: a bare number is a fraction and must lie in [0, 1]; a
    number followed by ``%`` is a percentage in [0, 100]. ``2`` is refused (write
    ``2%`` or ``0.02``), and so are NaN and infinities.

    Raises:
        EfrapError: anything else.
    """
    raw = text.strip()
    percent = raw.endswith("%")
    number = raw[:-1].strip() if percent else raw
    if number.lower() in _NON_FINITE:
        raise EfrapError(f"{what} must be finite, got '{text}'")
    if not _DECIMAL.fullmatch(number):
        raise EfrapError(f"{what} must be a fraction (0.05) or a percentage (5%) in plain decimal "
                         f"digits, got '{text}'")
    value = float(number)
    if not math.isfinite(value):
        raise EfrapError(f"{what} must be finite, got '{text}'")
    if percent:
        if not 0.0 <= value <= 100.0:
            raise EfrapError(f"{what} must be between 0% and 100%, got '{text}'")
        return value / 100.0
    if not 0.0 <= value <= 1.0:
        hint = f"; for {value:g} percent write '{raw}%'" if 1.0 < value <= 100.0 else ""
        raise EfrapError(f"{what} '{text}' is a fraction and must lie in [0, 1]{hint}")
    return value


def finite(value: float, what: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> float:
    """`value` if it is a finite number within the given bounds, else EfrapError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EfrapError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise EfrapError(f"{what} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise EfrapError(f"{what} must be {'above' if low_open else 'at least'} {low:g}, got {value:g}")
    if high is not None and value > high:
        raise EfrapError(f"{what} must be at most {high:g}, got {value:g}")
    return value


def integer(value: object, what: str, *, low: int | None = None, high: int | None = None) -> int:
    """`value` if it is an int (not a bool, not a float) within bounds, else EfrapError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise EfrapError(f"{what} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise EfrapError(f"{what} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise EfrapError(f"{what} must be at most {high}, got {value}")
    return value


def boolean(value: object, what: str) -> bool:
    """`value` if it is true or false (never a truthy string), else EfrapError."""
    if not isinstance(value, bool):
        raise EfrapError(f"{what} must be true or false, got {value!r}")
    return value


def string(value: object, what: str, choices: tuple[str, ...] | None = None) -> str:
    """`value` if it is a string (one of `choices` when given), else EfrapError."""
    if not isinstance(value, str):
        raise EfrapError(f"{what} must be a string, got {value!r}")
    if choices is not None and value not in choices:
        raise EfrapError(f"{what} must be one of {', '.join(choices)}, got '{value}'")
    return value


def table(value: object, what: str, known: set[str] | frozenset[str] | None = None) -> Mapping[str, Any]:
    """`value` if it is a JSON object / TOML table with only `known` keys, else EfrapError."""
    if not isinstance(value, dict):
        raise EfrapError(f"{what} must be a table/object")
    if known is not None:
        unknown = sorted(set(value) - set(known))
        if unknown:
            hints = [f"'{key}' (did you mean '{close[0]}'?)" if (close := difflib.get_close_matches(
                str(key), sorted(known), n=1)) else f"'{key}'" for key in unknown]
            raise EfrapError(f"{what}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}")
    return value


def _depth(value: object) -> int:
    # Iterative, so a hostile nesting cannot exhaust the stack here either.
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # JSON itself lets the last of two equal keys win silently; a config that says
    # "target": 0 and then "target": 5 is ambiguous, so it is refused (TOML refuses it too).
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key '{key}'")
        out[key] = value
    return out


def parse_json_text(text: str, source: str) -> Any:
    """Parse JSON from `source` strictly: no duplicate keys, no NaN/Infinity, bounded nesting.

    The one JSON reader of everything a user gives (configs, schemes, triggers,
    manifests, metadata).
    """
    return parse_config_text(text, source, toml=False)


def parse_config_text(text: str, source: str, toml: bool) -> Any:
    """Parse JSON or TOML text from `source`, refusing deep nesting, duplicate keys and
    non-finite numbers."""
    try:
        data = tomllib.loads(text) if toml else json.loads(
            text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise EfrapError(f"{source}: nested more than {MAX_CONFIG_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise EfrapError(f"{source}: cannot parse ({exc})") from None
    if _depth(data) > MAX_CONFIG_DEPTH:
        raise EfrapError(f"{source}: nested more than {MAX_CONFIG_DEPTH} levels deep")
    return data


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def load_config(path: str | Path, what: str = "config") -> Any:
    """Read a .json or .toml file (by suffix) with the checks of `parse_config_text`."""
    path = Path(path)
    if not path.is_file():
        raise EfrapError(f"{path}: no such {what} file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise EfrapError(f"{path}: a {what} file larger than {MAX_CONFIG_BYTES >> 10} KiB is refused")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EfrapError(f"{path}: cannot read {what} ({exc})") from None
    return parse_config_text(text, str(path), path.suffix.lower() == ".toml")
