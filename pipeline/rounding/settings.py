"""The rounding settings a user may set, and the one way a run's settings are resolved.

Every way in (the command line, a gate config's ``[defend]``, a batch manifest's
``preset`` and ``[rounding]``, `pipeline.api`) names the method, optionally EFRAP's preset,
and the fields it overrides; `method_settings` turns that into the method's own settings
(its `RoundingMethod.defaults` class) in force, so a preset means the same everywhere, a
field the method does not have is refused, and a value is checked by that class's one
`__post_init__`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, replace

from pipeline.base.errors import EfrapError
from pipeline.rounding import METHODS, get_method
from pipeline.rounding.base import RoundingSettings
from pipeline.rounding.efrap import EFRAP_PRESETS

#: The method whose settings come in presets.
PRESET_METHOD = "efrap"
#: EFRAP's preset when none is named: the project's rule, as `efrap defend` runs it.
DEFAULT_PRESET = "default"


def _field_types() -> dict[str, str]:
    """Every field of any method's settings and its type: EFRAP's first, in their order (the
    order the command line has always listed them in), then any other method's own, in the
    registry's order."""
    kinds = [type(METHODS[PRESET_METHOD].defaults)] + [type(m.defaults) for m in METHODS.values()]
    out: dict[str, str] = {}
    for kind in kinds:
        for f in fields(kind):
            # One name, one meaning: a field two methods share has one type (and one option).
            assert out.setdefault(f.name, str(f.type)) == str(f.type), (kind.__name__, f.name)
    return out


#: Each overridable field's type name ("int", "float", "str"): the union of every method's
#: settings (a batch manifest's [rounding] table reads its values by these).
FIELD_TYPES: dict[str, str] = _field_types()
#: Every field of any method's settings, in `FIELD_TYPES`'s order: each may be overridden
#: for a method that has it, and the command line has one option for each (``--iters``,
#: ``--batch-size``, ...; tests check the two match).
OVERRIDABLE: tuple[str, ...] = tuple(FIELD_TYPES)


def method_settings(method: str, preset: str | None = None,
                    overrides: Mapping[str, object] | None = None) -> RoundingSettings:
    """The rounding settings of a run.

    Args:
        method: The rounding method's name.
        preset: EFRAP's named settings (`EFRAP_PRESETS`); None: `DEFAULT_PRESET` for EFRAP,
            the method's own defaults for any other method.
        overrides: Fields of the method's settings to change (values already of the
            field's type).

    Returns:
        An instance of the method's own settings class (`type(get_method(method).defaults)`).

    Raises:
        EfrapError: an unknown method, preset or field, a preset for another method, a
            field the method does not have, or a value its settings refuse (one line,
            naming the field).
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
    own = [f.name for f in fields(base)]
    foreign = [name for name in OVERRIDABLE if name in given and name not in own]
    if foreign:
        raise EfrapError(f"method '{method}' has no setting {', '.join(repr(n) for n in foreign)}: "
                         f"its settings are {', '.join(own)}")
    return replace(base, **given) if given else base
