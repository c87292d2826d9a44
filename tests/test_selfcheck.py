"""The self-checking defend: the first candidate whose audit is clean ships; none, and it exits 1.

The audits run on the real candidates (the rounding, the check against FP, the rounding
statistics) with a stand-in scan, so each candidate's verdict is set by the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from pipeline.cli.commands import defend as defend_cli
from pipeline.cli.main import main
from pipeline.scan.report import ScanReport
from pipeline.selfcheck import MARKER, SUFFIX
from tests.conftest import export_tiny
from tests.scan_reports import defended, scan_report, verdict
from tests.test_audit import BUDGET, CASES

pytestmark = pytest.mark.usefixtures("fashion_mnist")

#: A rounding-backdoor verdict whose fresh trigger is weaker than the qcb case's (0.93 vs 0.96).
WEAKER = CASES["rounding-backdoor"]


def _scan_by_candidate(verdicts: dict[str, ScanReport], calls: list[str]):
    def scan(model: str, options: object, defended: str | None = None) -> ScanReport:
        assert defended is not None
        name = Path(defended).stem
        calls.append(name)
        return verdicts[name]
    return scan


def _defend(tiny: Path, out: Path, *extra: str) -> list[str]:
    return ["defend", str(tiny), "-o", str(out), "--scheme", "w4a4", "--self-check",
            "--iters", "20", "--num-calib", "64",
            "--holdout", "100", "--threads", "1", *extra]


def _meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return export_tiny(tmp_path / "tiny.onnx")


def test_first_candidate_flagged_ships_the_second(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[str] = []
    monkeypatch.setattr(defend_cli, "scan_model", _scan_by_candidate(
        {"default": CASES["qcb"], "adaround": CASES["clean"]}, calls))
    out, summary = tmp_path / "out.onnx", tmp_path / "summary.json"
    # No repair: the stand-in reports keep the fresh search's trigger, which a repair would use
    # (tests/test_repair.py ships a repaired candidate).
    assert main(_defend(tiny, out, "--no-repair", "--summary", str(summary))) == 0
    assert calls == ["default", "adaround"], "the search stops at the first candidate that passes"
    text = capsys.readouterr().out
    assert "self-check: default (efrap): audit qcb" in text and "FAILED" in text
    assert "self-check: adaround (adaround): audit clean" in text
    assert "shipped 'adaround', the first candidate that passed" in text
    meta = _meta(out)
    assert meta["efrap.method"] == "adaround"
    check = json.loads(meta["efrap.self_check"])
    assert check["shipped"] == "adaround" and check["passed"] is True
    assert [c["name"] for c in check["candidates"]] == ["default", "adaround"]
    assert [c["verdict"] for c in check["candidates"]] == ["qcb", "clean"]
    assert check["candidates"][0]["strongest_asr"] == pytest.approx(0.97)
    doc = json.loads(summary.read_text())["self_check"]
    assert doc["candidates"][1]["audit"]["verdict"] == "clean"
    assert not (tmp_path / f"out.onnx{SUFFIX}").exists(), "the candidates' folder is removed"


def test_no_candidate_passes_writes_the_weakest_and_exits_1(tiny: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[str] = []
    inconclusive = scan_report(verdict("inconclusive", None, 0.9, BUDGET), defended(None, False, None, None),
                               cut_short=True)
    monkeypatch.setattr(defend_cli, "scan_model", _scan_by_candidate(
        {"default": CASES["qcb"], "adaround": WEAKER, "lac": inconclusive}, calls))
    out = tmp_path / "out.onnx"
    assert main(_defend(tiny, out, "--no-repair", "--candidates", "default,adaround,lac")) == 1
    assert calls == ["default", "adaround", "lac"]
    text = capsys.readouterr().out
    assert "audit inconclusive" in text and "FAILED: no candidate passed" in text
    check = json.loads(_meta(out)["efrap.self_check"])
    assert check["passed"] is False and check["shipped"] == "adaround"
    assert [c["passed"] for c in check["candidates"]] == [False, False, False]
    assert _meta(out)["efrap.method"] == "adaround"


def test_self_check_refusals(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.onnx"
    assert main(_defend(tiny, out, "--candidates", "default,bogus")) == 2
    assert main(_defend(tiny, out, "--candidates", "default,default")) == 2
    assert main(_defend(tiny, out, "--preset", "release")) == 2
    assert main(_defend(tiny, out, "--flip-weight", "1")) == 2
    assert "takes only --iters" in capsys.readouterr().err
    folder = tmp_path / f"out.onnx{SUFFIX}"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    assert main(_defend(tiny, out)) == 2
    assert (folder / "mine.txt").read_text() == "keep" and not out.exists()
    assert not (folder / MARKER).exists()
