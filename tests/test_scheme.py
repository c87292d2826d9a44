"""Schemes are data: presets and files."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.base.errors import EfrapError
from pipeline.base.scheme import PRESETS, load_scheme


def test_presets() -> None:
    w8a8, w4a4 = PRESETS["w8a8"], PRESETS["w4a4"]
    assert w8a8.weight.qrange == (-127, 127) and w8a8.activation.qrange == (0, 255)
    assert w8a8.weight.per_channel and not w8a8.activation.symmetric
    assert w4a4.weight.qrange == (0, 15) and w4a4.weight.observer == "mse"
    assert w4a4.first_last_bits == 8


def test_scheme_files(tmp_path: Path) -> None:
    toml = tmp_path / "w4a8.toml"
    toml.write_text('name = "w4a8-ort"\nfirst_last_bits = 8\n[weight]\nbits = 4\nsymmetric = true\n'
                    'per_channel = true\nsymmetric_range = "full"\n[activation]\nbits = 8\n'
                    'symmetric = false\n')
    scheme = load_scheme(str(toml))
    assert scheme.weight.qrange == (-8, 7) and scheme.activation.qrange == (0, 255)
    js = tmp_path / "s.json"
    js.write_text('{"weight": {"bits": 8}, "activation": {"bits": 8, "symmetric": false,'
                  ' "observer": "percentile"}}')
    assert load_scheme(str(js)).activation.observer == "percentile"


@pytest.mark.parametrize("text", [
    '{"weight": {"bits": 3}, "activation": {"bits": 8}}',
    '{"weight": {"bits": 8, "observer": "magic"}, "activation": {"bits": 8}}',
    '{"weight": {"bits": 8}}',
    '{"weight": {"bits": 8}, "activation": {"bits": 8, "per_channel": true}}',
    "not json",
])
def test_bad_scheme_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(EfrapError, match=r"bad\.json"):
        load_scheme(str(path))


def test_unknown_preset() -> None:
    with pytest.raises(EfrapError, match="unknown scheme"):
        load_scheme("w2a2")
