"""One name, one default and one check for each setting, on every way in (issue: one pipeline)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from pipeline.base.errors import EfrapError
from pipeline.base.scheme import DEFAULT_SCHEME
from pipeline.cli.main import build_parser
from pipeline.gate.config import gate_config_from_dict
from pipeline.rounding import METHODS, EfrapConfig
from pipeline.rounding.base import LOSS_NAMES
from pipeline.rounding.efrap import EFRAP_PRESETS
from pipeline.rounding.losses import LOSSES
from pipeline.rounding.settings import FIELD_TYPES, OVERRIDABLE, method_settings

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "models" / "zoo"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in p._actions for s in a.option_strings}


def test_every_rounding_field_is_overridable_and_has_one_option() -> None:
    # The union of every method's settings, in the order EFRAP's (which has them all) lists them.
    union = {f.name: str(f.type) for m in METHODS.values() for f in fields(type(m.defaults))}
    assert set(OVERRIDABLE) == set(union) and {n: union[n] for n in OVERRIDABLE} == FIELD_TYPES
    assert tuple(f.name for f in fields(EfrapConfig)) == OVERRIDABLE
    for command in ("quantize", "defend"):
        options = _options(_subparsers()[command])
        for name in OVERRIDABLE:
            assert f"--{name.replace('_', '-')}" in options, (command, name)


def test_loss_names_are_the_registry() -> None:
    assert set(LOSS_NAMES) == set(LOSSES)


@pytest.mark.parametrize("command", ["quantize", "defend", "scan", "audit"])
def test_scheme_and_data_are_named_and_defaulted_alike(command: str) -> None:
    p = _subparsers()[command]
    options = _options(p)
    assert options["--scheme"].default == DEFAULT_SCHEME
    assert options["--data"] is options["--calib"]
    assert options["--data"].default == "fashion-mnist"


def test_verify_takes_data_too() -> None:
    assert _options(_subparsers()["verify"])["--data"].default == "fashion-mnist"


def test_reports_are_json_on_every_command() -> None:
    for command in ("quantize", "defend", "scan", "audit", "verify"):
        assert "--json" in _options(_subparsers()[command]), command
    # --summary stays a spelling of the same option.
    assert _options(_subparsers()["defend"])["--summary"].dest == "json"


def test_help_has_no_doubled_percent() -> None:
    for name, p in _subparsers().items():
        assert "%%" not in p.format_help(), name


def test_help_gives_every_rounding_default() -> None:
    text = " ".join(_subparsers()["defend"].format_help().split())
    for option in ("--error-units", "--error-mode", "--loss", "--samples", "--patience"):
        block = text[text.index(option + " ", text.index("learned rounding (")):]
        assert "(default" in block[:600], option


def test_unknown_loss_is_refused_before_any_work() -> None:
    with pytest.raises(EfrapError, match="loss must be one of mse, fisher, pd"):
        method_settings("adaround", None, {"loss": "msee"})
    r = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "defend",
                        str(ZOO / "fmnist_small_cnn_clean.onnx"), "-o", "never.onnx", "--loss", "msee"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "invalid choice: 'msee'" in r.stderr and not (ROOT / "never.onnx").exists()


def test_one_preset_resolution() -> None:
    assert method_settings("efrap") is EFRAP_PRESETS["default"]
    assert method_settings("efrap", "release") is EFRAP_PRESETS["release"]
    assert method_settings("efrap", "fast", {"iters": 7}).iters == 7
    with pytest.raises(EfrapError, match="presets are EFRAP's"):
        method_settings("adaround", "release")
    with pytest.raises(EfrapError, match="unknown preset 'slow'"):
        method_settings("efrap", "slow")
    with pytest.raises(EfrapError, match="at most 1,000,000"):
        method_settings("adaround", None, {"iters": 10**9})


def test_a_setting_of_another_method_is_refused() -> None:
    with pytest.raises(EfrapError, match=r"^method 'adaround' has no setting 'flip_weight': its settings are "
                                         "iters, batch_size, lr, reg_weight,"):
        method_settings("adaround", None, {"flip_weight": 1.0, "iters": 5})
    with pytest.raises(EfrapError, match="method 'lac' has no setting 'reg_weight', 'act_lr'"):
        method_settings("lac", None, {"act_lr": 1e-5, "reg_weight": 0.0})
    with pytest.raises(EfrapError, match="method 'nearest' has no setting 'iters'"):
        method_settings("nearest", None, {"iters": 5})
    assert method_settings("nearest", None, {"prune_rare": 0.03}).prune_rare == 0.03
    assert method_settings("lac", None, {"iters": 7}).iters == 7


def test_gate_unknown_key_says_what_was_meant(tmp_path: Path) -> None:
    data = {"model": str(ZOO / "fmnist_small_cnn_clean.onnx"), "data": "fashion-mnist", "scheme": "w8a8",
            "output": str(tmp_path / "out"), "defend": {"iter": 5}}
    with pytest.raises(EfrapError, match=r"unknown key 'iter' \(did you mean 'iters'\?\)"):
        gate_config_from_dict(data, "g.toml", tmp_path)
