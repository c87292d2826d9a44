"""The rounding settings a user may set, and the one way a run's settings are resolved.

Every way in (the command line, a gate config's ``[defend]``, a batch manifest's
``preset`` and ``[rounding]``, `pipeline.api`) names the method, optionally EFRAP's preset,
and the fields it overrides; `method_settings` turns that into the `RoundingConfig` in
force, so a preset means the same everywhere and an override is checked by the one
`RoundingConfig.__post_init__`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, replace

from pipeline.base.errors import EfrapError
from pipeline.rounding import get_method
from pipeline.rounding.base import RoundingConfig
from pipeline.rounding.efrap import EFRAP_PRESETS

#: Every `RoundingConfig` field, in its order: all of them may be overridden, and the command
#: line has one option for each (``--iters``, ``--batch-size``, ...; tests check the two match).
OVERRIDABLE: tuple[str, ...] = tuple(f.name for f in fields(RoundingConfig))
#: The method whose settings come in presets.
PRESET_METHOD = "efrap"
#: EFRAP's preset when none is named: the project's rule, as `efrap defend` runs it.
DEFAULT_PRESET = "default"


def method_settings(method: str, preset: str | None = None,
                    overrides: Mapping[str, object] | None = None) -> RoundingConfig:
    """The rounding settings of a run.

    Args:
        method: The rounding method's name.
        preset: EFRAP's named settings (`EFRAP_PRESETS`); None: `DEFAULT_PRESET` for EFRAP,
            the method's own defaults for any other method.
        overrides: `RoundingConfig` fields to change (values already of the field's type).

    Raises:
        EfrapError: an unknown method, preset or field, a preset for another method, or a
            value `RoundingConfig` refuses (one line, naming the field).
    """
    chosen = get_method(method)
    if preset is not None and method != PRESET_METHOD:
        raise EfrapError(f"presets are EFRAP's; method is '{method}'")
    if method == PRESET_METHOD:
        name = DEFAULT_PRESET if preset is None else preset
        if name not in EFRAP_PRESETS:
            raise EfrapError(f"unknown preset '{name}': choose from {', '.join(EFRAP_PRESETS)}")
        base = EFRAP_PRESETS[name]
    else:
        base = chosen.defaults
    given = dict(overrides or {})
    unknown = sorted(set(given) - set(OVERRIDABLE))
    if unknown:
        raise EfrapError(f"unknown rounding settings {unknown}: choose from {', '.join(OVERRIDABLE)}")
    return replace(base, **given) if given else base
