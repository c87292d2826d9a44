"""`efrap gate`: bad config files (one line naming the file and the field, exit 2, nothing written)
and a tiny end-to-end run with a stand-in scan (reports written, exit code by the thresholds)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import pipeline.cli.commands.gate as gate_cli
from pipeline.base.trigger import PatternTrigger, checkerboard
from pipeline.cli.main import main
from pipeline.gate import load_gate_config
from pipeline.scan import ScanReport, VerdictRule, decide, run_test
from tests.conftest import export_tiny
from tests.scan_reports import found, outlier_test, scan_report, verdict
from validators.limits import VerifyLimits

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
                               "thresholds: unknown key 'max_asr' (did you mean 'max_trigger_asr'?)"),
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
    "iterations for nearest": (GOOD.replace('method = "efrap"', 'method = "nearest"')
                               .format(thresholds=PASSING), "method 'nearest' has no setting 'iters'"),
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


def _searches(diff: list[float], fp: list[float]) -> dict:
    """Every class searched in both modes, with these smallest sizes (a size under 0.1 found)."""
    return {c: [found(c, "diff", d, hit=d < 0.1), found(c, "fp", f, hit=f < 0.1)]
            for c, (d, f) in enumerate(zip(diff, fp, strict=True))}


def _stand_in(name: str, trigger: PatternTrigger | None) -> ScanReport:
    """The stand-in scan's report: class 0's differential trigger stands out (index 3.0)."""
    target = 0 if trigger is not None else None
    differential = outlier_test("differential", range(10), [3.0] + [0.2] * 9, candidate=0, flagged=True)
    return scan_report(verdict(name, target, 0.9, "a <b>stand-in</b> scan", differential),
                       cut_short=name == "inconclusive", trigger=trigger,
                       trigger_asr={"fp": 0.02, "nearest": 0.9},
                       searches=_searches([0.01] + [0.2] * 9, [0.3] * 10))


def _fake(name: str, calls: list, trigger: PatternTrigger | None = None, no_trigger: bool = False,
          change: dict | None = None) -> object:
    """A stand-in for scan_model; `change`: fields of its report to replace."""
    trigger = None if no_trigger else trigger or checkerboard(4, 28, 28, 1, target=0, margin=1)

    def scan(model: str, options: object, defended: str | None = None) -> ScanReport:
        calls.append((model, options, defended))
        return replace(_stand_in(name, trigger), **(change or {}))

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
    # Nearest has no iterations: the config's iters goes with the method.
    config = _write(folder, GOOD.format(thresholds=PASSING).replace('method = "efrap"\niters = 2',
                                                                    'method = "nearest"'))
    assert main(["gate", str(config)]) == 1
    report = json.loads((folder / "out" / "report.json").read_text())
    verdict = report["checks"][0]
    assert verdict["name"] == "scan verdict" and not verdict["passed"] and "no rounding" in verdict["why"]


# ---------------------------------------------------------------------------- evidence or nothing


ZOO_QCB = Path(__file__).resolve().parents[1] / "models" / "zoo" / "fmnist_compartifact_w4a4.onnx"


def test_a_scan_the_budget_stops_fails_the_gate(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Measured before: [scan] budget = 1.0 on this model let 0 of 9 searches run, the verdict
    # was clean, the trigger check "not measurable ... pass", and the gate PASSED (exit 0).
    rng = np.random.default_rng(0)
    np.savez(folder / "zoo.npz", x=rng.integers(0, 256, (400, 28, 28), dtype=np.uint8),
             y=(np.arange(400) % 10).astype(np.int64))
    text = (GOOD.replace('"tiny.onnx"', f'"{ZOO_QCB}"').replace("npz:data.npz", "npz:zoo.npz")
            .replace('scheme = "w8a8"', 'scheme = "w4a4"')
            .replace("[preprocess]\nmean = [0.5]\nstd = [0.25]\n", "")
            .replace("budget = 5.0\nnum_calib = 64", "budget = 1e-9\nnum_calib = 128\nholdout = 64")
            .replace('method = "efrap"\niters = 2', 'method = "nearest"'))
    assert main(["gate", str(_write(folder, text.format(thresholds=PASSING)))]) == 1
    printed = capsys.readouterr().out
    assert printed.startswith("# efrap gate: FAILED") and "PASSED" not in printed
    report = json.loads((folder / "out" / "report.json").read_text())
    assert not report["passed"] and report["exit_code"] == 1
    verdict, trigger = report["checks"][0], report["checks"][1]
    assert verdict["value"] == "inconclusive" and not verdict["passed"] and "did not finish" in verdict["why"]
    assert trigger["value"] is None and not trigger["passed"] and "not measurable" in trigger["why"]
    assert report["scan"]["report"]["coverage"]["classes"]["not searched"] == list(range(10))
    markdown, page = (folder / "out" / "summary.md").read_text(), (folder / "out" / "report.html").read_text()
    for text in (markdown, page):
        assert "The scan is inconclusive: no search ran" in text and "not searched" in text
        assert "An inconclusive scan fails the gate" in text


def test_no_recovered_trigger_fails_the_trigger_check(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gate_cli, "scan_model", _fake("clean", [], no_trigger=True))
    assert main(["gate", str(_write(folder, GOOD.format(thresholds=PASSING)))]) == 1
    report = json.loads((folder / "out" / "report.json").read_text())
    check = next(c for c in report["checks"] if c["name"] == "recovered trigger on the defended model")
    assert check["value"] is None and not check["passed"] and check["why"].startswith("not measurable")
    assert report["checks"][0]["passed"]  # the verdict itself (clean, finished) passes: the figure fails


def test_a_scan_report_that_does_not_say_it_finished_fails(folder: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Fail closed: a report that does not say it finished, or a verdict the gate does not know.
    for i, change in enumerate(({"cut_short": None}, {"verdict": verdict("probably-fine")})):
        monkeypatch.setattr(gate_cli, "scan_model", _fake("clean", [], change=change))
        config = _write(folder, GOOD.format(thresholds=PASSING).replace('"out"', f'"out{i}"'))
        assert main(["gate", str(config)]) == 1
        check = json.loads((folder / f"out{i}" / "report.json").read_text())["checks"][0]
        assert check["name"] == "scan verdict" and not check["passed"]


def test_a_nan_figure_is_not_measurable_and_fails() -> None:
    limits = VerifyLimits(min_accuracy=0.5, max_asr=0.1, max_parity_diff=0.1)
    result = limits.evaluate(math.nan, 0.01, math.nan)
    assert not result.passed
    assert [(c.value, c.passed) for c in result.checks] == [(None, False), (0.01, True), (None, False)]
    assert all(c.why == "not measurable" for c in result.checks if c.value is None)


def test_reports_say_why_a_class_above_the_threshold_is_not_a_finding(
        folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Two classes far above the anomaly threshold, neither a finding of the differential test:
    # class 0 wakes in FP too (the verdict is fp-backdoor), class 1's trigger was never
    # confirmed (its size a lower bound; the measured "index 16 under a clean verdict").
    rule = VerdictRule()
    diff = run_test("differential", range(10), [0.02, 0.02] + [0.2] * 8, [True, False] + [False] * 8, rule)
    fp = run_test("fp", range(10), [0.005, 0.05, 0.06, 0.045, 0.07, 0.055, 0.05, 0.065, 0.08, 0.06],
                  [True] * 10, rule)
    decided = decide(diff, fp)
    assert decided.verdict == "fp-backdoor" and min(diff.anomaly[:2]) > rule.threshold
    change = {"verdict": decided,
              "searches": _searches([0.02, 0.02] + [0.2] * 8, [0.05] * 10)}
    monkeypatch.setattr(gate_cli, "scan_model", _fake("fp-backdoor", [], change=change))
    assert main(["gate", str(_write(folder, GOOD.format(thresholds=PASSING)))]) == 1
    capsys.readouterr()
    markdown, page = (folder / "out" / "summary.md").read_text(), (folder / "out" / "report.html").read_text()
    for text in (markdown, page):
        assert "FP also wakes" in text and "no trigger was confirmed" in text
        assert "not a finding because" in text
    rows = {line.split(" | ")[0]: line for line in markdown.splitlines() if " | searched | " in line}
    assert "FP also wakes" in rows["| 0"] and "fp-backdoor" in rows["| 0"]
    assert "no trigger was confirmed" in rows["| 1"] and f"{diff.anomaly[1]:.2f}" in rows["| 1"]
