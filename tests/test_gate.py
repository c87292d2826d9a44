"""`efrap gate`: bad config files (one line naming the file and the field, exit 2, nothing written)
and a tiny end-to-end run with a stand-in scan (reports written, exit code by the thresholds)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import pipeline.cli.commands.gate as gate_cli
from pipeline.base.trigger import PatternTrigger, checkerboard
from pipeline.cli.main import main
from pipeline.gate import load_gate_config
from tests.conftest import export_tiny

GOOD = """model = "tiny.onnx"
data = "npz:data.npz"
scheme = "w8a8"
output = "out"

[preprocess]
mean = [0.5]
std = [0.25]

[scan]
budget = 5.0
num_calib = 64

[defend]
method = "efrap"
iters = 2
num_calib = 64
holdout = 32

[verify]
opt_level = "faithful"
provider = "cpu"

[thresholds]
{thresholds}
"""
PASSING = ('max_trigger_asr = "99%"\nmax_agreement_drop = 0.99\nmin_accuracy = 0.01\n'
           'fail_verdicts = ["fp-backdoor"]')


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder with a tiny model and a labelled npz data set (both splits)."""
    export_tiny(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.integers(0, 256, (96, 28, 28), dtype=np.uint8),
             y=(np.arange(96) % 10).astype(np.int64))
    return tmp_path


def _write(folder: Path, text: str, name: str = "gate.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- bad configs


BAD = {
    "unknown top-level key": (GOOD.format(thresholds=PASSING) + 'colour = "red"\n', "colour"),
    "unknown key in a table": (GOOD.format(thresholds="max_asr = 0.1"),
                               "thresholds: unknown keys ['max_asr']"),
    "integer written as a string": (GOOD.replace("num_calib = 64\n\n[defend]", 'num_calib = "64"\n\n[defend]')
                                    .format(thresholds=PASSING), "scan.num_calib must be an integer"),
    "integer written as a float": (GOOD.replace("iters = 2", "iters = 2.0").format(thresholds=PASSING),
                                   "defend.iters must be an integer"),
    "flag where a number belongs": (GOOD.format(thresholds="max_trigger_asr = true"),
                                    "thresholds.max_trigger_asr must be a number"),
    "missing model": (GOOD.replace('"tiny.onnx"', '"nope.onnx"').format(thresholds=PASSING),
                      "model: no such file 'nope.onnx'"),
    "missing field": (GOOD.replace('output = "out"\n', "").format(thresholds=PASSING), "output: missing"),
    "threshold above 1": (GOOD.format(thresholds="max_trigger_asr = 2"),
                          "thresholds.max_trigger_asr must be at most 1"),
    "percentage above 100": (GOOD.format(thresholds='min_accuracy = "150%"'), "thresholds.min_accuracy"),
    "threshold nobody fails": (GOOD.format(thresholds="min_accuracy = 0"), "lets every model pass"),
    "clean as a failing verdict": (GOOD.format(thresholds='fail_verdicts = ["clean"]'), "fail_verdicts"),
    "unknown verdict": (GOOD.format(thresholds='fail_verdicts = ["evil"]'), "fail_verdicts must be one of"),
    "unknown method": (GOOD.replace('method = "efrap"', 'method = "magic"').format(thresholds=PASSING),
                       "defend.method must be one of"),
    "preset of another method": (GOOD.replace('method = "efrap"', 'method = "adaround"\npreset = "release"')
                                 .format(thresholds=PASSING), "defend.preset"),
    "missing data": (GOOD.replace("npz:data.npz", "npz:nope.npz").format(thresholds=PASSING), "nope.npz"),
    "deep nesting": (GOOD.format(thresholds=PASSING) + "[" + ".".join(f"k{i}" for i in range(20))
                     + "]\nx = 1\n",
                     "nested more than 16 levels deep"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_one_line_exit_2_and_writes_nothing(folder: Path, case: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    text, expect = BAD[case]
    config = _write(folder, text)
    before = sorted(p.name for p in folder.iterdir())
    assert main(["gate", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("efrap gate: error: ")
    assert str(config) in err[0] and expect in err[0], err[0]
    assert sorted(p.name for p in folder.iterdir()) == before  # no output folder, no report


def test_config_paths_are_relative_to_the_config(folder: Path) -> None:
    config = load_gate_config(_write(folder, GOOD.format(thresholds=PASSING)))
    assert config.model == folder / "tiny.onnx" and config.output == folder / "out"
    assert config.data == f"npz:{folder / 'data.npz'}"
    assert config.thresholds.fail_verdicts == ("fp-backdoor",)
    assert config.preprocess == {"mean": (0.5,), "std": (0.25,)}


def test_fp_backdoor_always_fails(folder: Path) -> None:
    config = load_gate_config(_write(folder, GOOD.format(thresholds='fail_verdicts = ["qcb"]')))
    assert config.thresholds.fail_verdicts == ("fp-backdoor", "qcb")


# ---------------------------------------------------------------------------- end to end


@dataclass
class FakeVerdict:
    verdict: str
    target: int | None
    confidence: float
    reason: str


class FakeScanReport:
    """A stand-in for pipeline.scan.ScanReport: the attributes and JSON keys the gate reads."""

    def __init__(self, verdict: str, trigger: PatternTrigger | None) -> None:
        self.verdict = FakeVerdict(verdict, 0 if trigger is not None else None, 0.9, "a <b>stand-in</b> scan")
        self.trigger = trigger

    def to_json(self, trigger_file: str | None = None) -> dict:
        per_class = {str(c): {"drift": 0.0, "searched": True, "differential_size": 0.01 if c == 0 else 0.2,
                              "fp_size": 0.3} for c in range(10)}
        return {"verdict": self.verdict.verdict, "target": self.verdict.target, "confidence": 0.9,
                "reason": self.verdict.reason,
                "trigger": None if self.trigger is None else {
                    "file": trigger_file,
                    "figures": {"asr": {"fp": 0.02, "nearest": 0.9}, "images": 32, "non_target_images": 29}},
                "classes": per_class,
                "tests": {"differential": {"per_class": {str(c): {"anomaly": 3.0 if c == 0 else 0.2}
                                                         for c in range(10)}}},
                "settings": {"rule": {"threshold": 2.0}}, "data": "npz", "holdout_images": 32,
                "onnxruntime": {"opt_level": "faithful", "provider": "CPUExecutionProvider"}, "seconds": 0.1,
                "cut_short": self.verdict.verdict == "inconclusive"}


def _fake(verdict: str, calls: list) -> object:
    trigger = checkerboard(4, 28, 28, 1, target=0, margin=1)

    def scan(model: str, options: object, defended: str | None = None) -> FakeScanReport:
        calls.append((model, options, defended))
        return FakeScanReport(verdict, trigger)

    return scan


def test_gate_end_to_end(folder: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    calls: list = []
    monkeypatch.setattr(gate_cli, "scan_model", _fake("qcb", calls))
    config = _write(folder, GOOD.format(thresholds=PASSING))
    assert main(["gate", str(config)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# efrap gate: PASSED")
    out = folder / "out"
    assert {p.name for p in out.iterdir()} == {"report.json", "summary.md", "report.html", "defended.onnx",
                                                "recovered.trigger.json", "recovered.trigger.npz"}
    assert calls and calls[0][0] == str(folder / "tiny.onnx") and calls[0][1].budget == 5.0
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["exit_code"] == 0
    sha = report["model"]["sha256"]
    assert len(sha) == 64
    for check in report["checks"]:
        on = check["measured_on"]
        assert on["sha256"] and on["data"] and on["opt_level"] and on["provider"], check
    assert report["verify"]["defended"]["measured_on"]["opt_level"] == "faithful"
    assert len(report["verify"]["per_class"]["defended"]) == 10
    markdown = (out / "summary.md").read_text()
    assert markdown == printed.rstrip("\n") + "\n" or markdown.strip() == printed.strip()
    assert sha in markdown
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # trigger images, scan per class, accuracy per class
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "&lt;b&gt;stand-in&lt;/b&gt;" in page  # outside text is escaped

    # The same model against a threshold it cannot meet: exit 1, reports say why.
    strict = _write(folder, GOOD.format(thresholds="min_accuracy = 0.99").replace('"out"', '"out2"'),
                    "strict.toml")
    assert main(["gate", str(strict)]) == 1
    failed = json.loads((folder / "out2" / "report.json").read_text())
    assert not failed["passed"] and failed["exit_code"] == 1
    assert [c["passed"] for c in failed["checks"] if c["name"].startswith("clean accuracy")] == [False]
    assert capsys.readouterr().out.startswith("# efrap gate: FAILED")


def test_fp_backdoor_verdict_fails_the_release(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gate_cli, "scan_model", _fake("fp-backdoor", []))
    config = _write(folder, GOOD.format(thresholds=PASSING).replace('method = "efrap"', 'method = "nearest"'))
    assert main(["gate", str(config)]) == 1
    report = json.loads((folder / "out" / "report.json").read_text())
    verdict = report["checks"][0]
    assert verdict["name"] == "scan verdict" and not verdict["passed"] and "no rounding" in verdict["why"]
