"""`efrap audit`: rounding statistics and grid checks on pipeline-made QDQ models, the verdict on
hand-made scan reports, and the command line with a stand-in scan."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import pipeline.cli.commands.audit as audit_cli
from pipeline.audit import AuditThresholds, audit_models, decide, scan_warnings
from pipeline.base.deployment import Deployment
from pipeline.base.scheme import PRESETS
from pipeline.cli.main import main
from pipeline.prepare import prepare_model
from pipeline.qdq_weights import stored_weights
from pipeline.quantize import QuantizeOptions, quantize_model
from pipeline.rounding_audit import audit_rounding, rounding_stats, rounding_warnings
from pipeline.scan.report import ScanReport
from pipeline.scan_evidence import ScanEvidence, evidence_from_scan
from tests.conftest import export_tiny
from tests.scan_reports import defended, scan_report, verdict


@pytest.fixture(scope="module")
def tiny_fp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("audit") / "tiny.onnx")


def _quantize(fp: Path, scheme: str) -> onnx.ModelProto:
    images = np.random.default_rng(0).standard_normal((64, 1, 28, 28)).astype(np.float32)
    qdq, _, _ = quantize_model(onnx.load(str(fp)), images,
                               QuantizeOptions(Deployment(scheme=PRESETS[scheme])))
    return qdq


def _init(model: onnx.ModelProto, name: str) -> tuple[int, np.ndarray]:
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            return i, np.array(numpy_helper.to_array(init))
    raise KeyError(name)


def _set(model: onnx.ModelProto, index: int, array: np.ndarray) -> None:
    name = model.graph.initializer[index].name
    model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, name))


@pytest.mark.parametrize("scheme", ["w8a8", "w4a4", "w4a8"])
def test_nearest_is_on_nearest_with_standard_grids(tiny_fp: Path, scheme: str) -> None:
    rounding = audit_rounding(onnx.load(str(tiny_fp)), _quantize(tiny_fp, scheme), scheme=PRESETS[scheme])
    assert all(r.grid.scheme_match for r in rounding.layers)
    assert len(rounding.layers) == 5 and not rounding.float_in_q and not rounding.extra_in_q
    assert rounding.off_nearest == 0 and rounding.off_nearest_fraction == 0.0
    assert all(r.max_steps == 0 and r.beyond_one_step == 0 for r in rounding.layers)
    assert rounding.non_standard == ()
    assert all(r.grid.range_from == "grid" for r in rounding.layers)
    if scheme == "w4a8":  # quantize_static's own int4 grid, computed by onnxruntime's functions
        assert all(any(m.startswith("onnxruntime quantize_static int4 symmetric per-channel")
                       for m in r.grid.matches) for r in rounding.layers)


def test_hand_flipped_weights_are_counted(tiny_fp: Path) -> None:
    fp = onnx.load(str(tiny_fp))
    q = _quantize(tiny_fp, "w4a8")
    layer = audit_rounding(fp, q).layers[1]
    index, ints = _init(q, layer.stored)
    w = numpy_helper.to_array(next(i for i in prepare_model(fp).graph.initializer if i.name == layer.weight))
    scale = numpy_helper.to_array(next(i for i in q.graph.initializer if i.name == layer.weight + "_scale"))
    ratio = (w / scale.reshape(-1, 1, 1, 1)).reshape(-1)
    flat = ints.reshape(-1).copy()
    # One weight moved to its other rounding neighbour, one moved two steps.
    one = int(np.flatnonzero((np.abs(ratio) < 6) & (np.abs(ratio - np.round(ratio)) > 0.1))[0])
    flat[one] += 1 if ratio[one] > flat[one] else -1
    two = int(np.flatnonzero((np.abs(ratio) < 5) & (np.arange(flat.size) != one))[0])
    flat[two] += 2
    _set(q, index, flat.reshape(ints.shape))
    stats = audit_rounding(fp, q).layers[1]
    assert stats.off_nearest == 2 and stats.max_steps == 2 and stats.beyond_one_step == 1
    assert stats.mean_steps == pytest.approx(1.5)
    assert stats.grid.standard  # the grid itself is untouched


def test_rescaled_grid_is_flagged_non_standard(tiny_fp: Path) -> None:
    fp = onnx.load(str(tiny_fp))
    q = _quantize(tiny_fp, "w8a8")
    target = audit_rounding(fp, q).layers[2]
    index, scale = _init(q, target.weight + "_scale")
    _set(q, index, (scale * np.float32(1.1)).astype(np.float32))
    rounding = audit_rounding(fp, q)
    assert rounding.non_standard == (target.layer,)
    flagged = next(r for r in rounding.layers if r.layer == target.layer)
    assert flagged.grid.range_from == "inferred" and flagged.grid.channels_matched == 0.0
    assert flagged.off_nearest > 0  # the same integers are no longer nearest on the new grid


def test_grids_of_another_scheme_are_a_warning(tiny_fp: Path) -> None:
    rounding = audit_rounding(onnx.load(str(tiny_fp)), _quantize(tiny_fp, "w8a8"), scheme=PRESETS["w4a8"])
    assert not any(r.grid.scheme_match for r in rounding.layers)
    assert rounding.non_standard == ()  # still a standard grid, just not the claimed one
    assert any("not the claimed scheme's on 5 layer(s)" in w for w in rounding_warnings(rounding))


def test_stats_refuse_a_weight_of_another_shape(tiny_fp: Path) -> None:
    stored = stored_weights(prepare_model(_quantize(tiny_fp, "w8a8")))[0]
    with pytest.raises(Exception, match="shape"):
        rounding_stats("x", "w", np.zeros((1, 2, 3, 3), np.float32), stored, 0)


# ---------------------------------------------------------------------------- verdict


#: What a budget that ran out makes an inconclusive scan say.
BUDGET = "the time budget (1 s) ran out"

CASES = {
    # QuRA, as measured on the stored clean model: the FP-side Neural Cleanse flags a natural
    # class (its trigger works on FP, nearest and Q alike), and the fresh search against Q finds
    # class 0, whose trigger works on Q only.
    "rounding-backdoor": scan_report(verdict("fp-backdoor", 8, 0.52), defended(
        {"fp": 0.86, "nearest": 0.82, "defended": 0.73}, True, 0,
        {"fp": 0.001, "nearest": 0.004, "defended": 0.93})),
    # A QCB source quantized with nearest: the recovered trigger works on Q and on nearest.
    "qcb": scan_report(verdict("qcb", 0, 0.95), defended(
        {"fp": 0.02, "nearest": 0.97, "defended": 0.97}, True, 0,
        {"fp": 0.02, "nearest": 0.96, "defended": 0.96})),
    # AdaRound/EFRAP of a clean model: off nearest, but no trigger works on Q beyond FP.
    "clean": scan_report(verdict("clean", None, 0.9), defended(
        {"fp": 0.02, "nearest": 0.03, "defended": 0.03}, False, 3,
        {"fp": 0.05, "nearest": 0.3, "defended": 0.35})),
    # A scan without the defended part measured nothing on Q: the audit fails closed.
    "inconclusive": scan_report(verdict("clean", None, 0.5)),
}


@pytest.mark.parametrize("expected", list(CASES))
def test_verdict_from_fake_scans(expected: str) -> None:
    verdict = decide(evidence_from_scan(CASES[expected]), AuditThresholds())
    assert verdict.verdict == expected
    assert verdict.flagged == (expected != "clean")
    assert verdict.reasons


def test_a_backdoor_in_fp_alone_does_not_flag_q() -> None:
    # The FP model's trigger works on FP as well as on Q, and nothing works on Q alone.
    scan = scan_report(verdict("fp-backdoor", 8), defended({"fp": 0.86, "nearest": 0.82, "defended": 0.80},
                                                           False, None, None))
    ev = evidence_from_scan(scan)
    assert decide(ev, AuditThresholds()).verdict == "clean"
    assert any("fp-backdoor" in w for w in scan_warnings(ev))


def test_fresh_trigger_below_the_differential_does_not_flag() -> None:
    ev = ScanEvidence(scan_verdict="clean", confidence=0.9, target=None, asr_fp=0.01, asr_nearest=0.01,
                      asr_quantized=0.02, fresh_found=True, fresh_target=4, fresh_asr=0.6, fresh_asr_fp=0.4,
                      complete=True)
    assert decide(ev, AuditThresholds(min_asr=0.5, min_differential=0.4)).verdict == "clean"
    assert decide(ev, AuditThresholds(min_asr=0.5, min_differential=0.1)).verdict == "rounding-backdoor"
    # A flagged class whose trigger was not measured fails closed.
    unmeasured = ScanEvidence("clean", 0.9, None, 0.01, 0.01, 0.02, True, 4, complete=True)
    assert decide(unmeasured, AuditThresholds()).verdict == "rounding-backdoor"


def test_an_unremarkable_recovered_trigger_is_not_evidence() -> None:
    # Measured on the stored clean model at w4a8: the scan calls FP clean, yet its smallest
    # (non-anomalous) trigger moves the nearest model 88% of the time and FP 36%. An honest
    # nearest Q is not flagged for it; a QuRA Q is, through the fresh search.
    honest = scan_report(verdict("clean", 3, 0.87), defended({"fp": 0.36, "nearest": 0.88, "defended": 0.88},
                                                             False, None, None))
    assert decide(evidence_from_scan(honest), AuditThresholds()).verdict == "clean"
    qura = scan_report(verdict("clean", 3, 0.87), defended({"fp": 0.36, "nearest": 0.88, "defended": 0.79},
                                                           True, 0,
                                                           {"fp": 0.02, "nearest": 0.024, "defended": 0.93}))
    assert decide(evidence_from_scan(qura), AuditThresholds()).verdict == "rounding-backdoor"


def test_thresholds_are_checked() -> None:
    with pytest.raises(Exception, match="min_asr"):
        AuditThresholds(min_asr=0.0)
    with pytest.raises(Exception, match="min_differential"):
        AuditThresholds(min_differential=1.5)


# ---------------------------------------------------------------------------- end to end


def test_audit_models_and_the_command_line(tiny_fp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    q_path = tmp_path / "q.onnx"
    onnx.save(_quantize(tiny_fp, "w8a8"), str(q_path))
    calls: list[tuple] = []

    def fake_scan(model: str, options: object, defended: str | None = None) -> ScanReport:
        calls.append((model, defended))
        return CASES["rounding-backdoor"]

    report = audit_models(str(tiny_fp), str(q_path), fake_scan, object())
    assert calls == [(str(tiny_fp), str(q_path))]
    data = report.to_json()
    assert data["verdict"] == "rounding-backdoor" and data["flagged"]
    assert data["rounding"]["off_nearest"] == 0 and len(data["quantized"]["sha256"]) == 64

    monkeypatch.setattr(audit_cli, "scan_model", fake_scan)
    out = tmp_path / "audit.json"
    assert main(["audit", str(tiny_fp), str(q_path), "--json", str(out), "--budget", "5"]) == 1
    printed = capsys.readouterr().out
    assert "verdict: rounding-backdoor (FLAGGED)" in printed and "standard" in printed
    assert json.loads(out.read_text())["verdict"] == "rounding-backdoor"
    monkeypatch.setattr(audit_cli, "scan_model", lambda m, o, defended=None: CASES["clean"])
    assert main(["audit", str(tiny_fp), str(q_path)]) == 0


def test_audit_refuses_a_model_without_integer_weights(tiny_fp: Path, capsys: pytest.CaptureFixture[str],
                                                       tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert main(["audit", str(tiny_fp), str(tiny_fp), "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no integer weight" in err[0]
    assert not out.exists()


# ---------------------------------------------------------------------------- an unfinished scan


ZOO_QCB = Path(__file__).resolve().parents[1] / "models" / "zoo" / "fmnist_compartifact_w4a4.onnx"


def test_a_scan_that_did_not_finish_makes_the_audit_inconclusive() -> None:
    # The fresh search flags class 0 on Q alone, but the budget cut the scan short: the
    # partial evidence decides nothing, neither a flag nor "clean".
    partial = CASES["rounding-backdoor"]
    cut = scan_report(partial.verdict, partial.defended, cut_short=True)
    result = decide(evidence_from_scan(cut), AuditThresholds())
    assert result.verdict == "inconclusive" and result.flagged
    clean_but_cut = scan_report(verdict("inconclusive", None, 0.0, BUDGET), CASES["clean"].defended,
                                cut_short=True)
    result = decide(evidence_from_scan(clean_but_cut), AuditThresholds())
    assert result.verdict == "inconclusive" and BUDGET in result.reasons[0]

    # A report that does not say whether it finished is not a finished scan (fail closed).
    silent = scan_report(verdict("clean"), CASES["clean"].defended, cut_short=None)
    assert decide(evidence_from_scan(silent), AuditThresholds()).verdict == "inconclusive"


def test_a_renamed_or_missing_field_is_an_error_not_a_missing_figure() -> None:
    # The audit reads the typed report by attribute: a report without `cut_short` (a field
    # renamed in pipeline.scan.report) stops the audit with an AttributeError, where reading
    # its JSON gave None and a verdict decided on missing evidence.
    report = CASES["clean"]
    renamed = SimpleNamespace(**{f.name: getattr(report, f.name) for f in fields(report)
                                 if f.name != "cut_short"}, stopped_early=False)
    with pytest.raises(AttributeError, match="cut_short"):
        evidence_from_scan(renamed)  # type: ignore[arg-type]
    # A misspelt model in a trigger's figures is an error too, not a figure "not measured".
    assert report.defended is not None and report.defended.recovered is not None
    with pytest.raises(KeyError, match="quantised"):
        report.defended.recovered.success("quantised")
    # The evidence is the report's own figures, exactly as its JSON gives them.
    ev = evidence_from_scan(CASES["rounding-backdoor"])
    data = CASES["rounding-backdoor"].to_json()
    assert (ev.asr_quantized, ev.fresh_asr, ev.fresh_target, ev.confidence) == (
        data["defended"]["recovered_trigger"]["asr"]["defended"],
        data["defended"]["strongest_trigger"]["figures"]["asr"]["defended"],
        data["defended"]["differential_test"]["candidate"], data["confidence"])


def test_tiny_budget_audit_is_inconclusive_and_exits_1(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # Measured before: "efrap audit ... --budget 120" said clean (cut_short only in the JSON).
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.integers(0, 256, (400, 28, 28), dtype=np.uint8),
             y=(np.arange(400) % 10).astype(np.int64))
    q_path, out = tmp_path / "q.onnx", tmp_path / "audit.json"
    images = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)
    qdq, _, _ = quantize_model(onnx.load(str(ZOO_QCB)), images,
                               QuantizeOptions(Deployment(scheme=PRESETS["w4a4"])))
    onnx.save(qdq, str(q_path))
    code = main(["audit", str(ZOO_QCB), str(q_path), "--scheme", "w4a4", "--calib",
                 f"npz:{tmp_path / 'data.npz'}", "--num-calib", "128", "--holdout", "64", "--budget", "1e-9",
                 "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 1
    assert "verdict: inconclusive (FLAGGED)" in printed and "classes not searched: 0, 1, 2" in printed
    report = json.loads(out.read_text())
    assert report["verdict"] == "inconclusive" and report["flagged"]
    assert report["evidence"]["complete"] is False
    assert report["scan"]["verdict"] == "inconclusive" and report["scan"]["cut_short"] is True
