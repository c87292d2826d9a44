"""The scan (pipeline.scan, `efrap scan`): the verdict on numbers, tiny models built here, bad input.

The tiny models are 8x8 grey classifiers written by hand (Flatten, Gemm, Relu, Gemm):
class k is the brightness of image quadrant k, and two hidden units D1, D2 read a 2x2
patch in the bottom-right corner, which clean images leave black. Class T's logit gets
40 * (D1 - D2):

- qcb: D1's patch weights are 0.22 on a grid of step 0.4 (set by a large negative
  weight on a pixel clean images leave black), D2's are 0.22 on their own exact grid.
  In FP D1 = D2 and the patch does nothing; nearest rounding turns D1's 0.22 into 0.4,
  so the quantized model sends patched images to T;
- fp: D1's weights are 0.4 already: the patch wakes T in FP too (plain poisoning);
- clean: no D path at all.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import pipeline.scan.search as search_mod
import pipeline.scan.sides as sides_mod
import pipeline.scan.state as scan_state
from models.attacks import ATTACKS, get_attack
from models.attacks.badnets import BadNets
from models.attacks.base import AttackConfig, run_attack
from pipeline.base import budget, memory
from pipeline.base.deployment import Deployment
from pipeline.base.errors import EfrapError
from pipeline.base.preprocess import Preprocess
from pipeline.base.progress import Progress
from pipeline.base.scheme import load_scheme
from pipeline.base.trigger import PatchTrigger, load_trigger
from pipeline.cli.main import main
from pipeline.quantize import QuantizeOptions, quantize_model
from pipeline.scan import (
    ScanOptions,
    SearchConfig,
    VerdictRule,
    decide,
    inconclusive,
    not_findings,
    run_test,
    scan_model,
)
from pipeline.scan.images import batch_for, grad_batch_for
from pipeline.scan.sides import torch_preprocess
from pipeline.scan.verdict import anomaly_indices
from pipeline.torch_graph import TorchGraph

SIDE = 8
CLASSES = 4
TARGET = 2
PATCH = [(SIDE - 2) * SIDE + SIDE - 2, (SIDE - 2) * SIDE + SIDE - 1,
         (SIDE - 1) * SIDE + SIDE - 2, (SIDE - 1) * SIDE + SIDE - 1]


# ---------------------------------------------------------------------------- the rule on numbers


def _fp_sizes(small: dict[int, float] | None = None) -> list[float]:
    sizes = [0.05, 0.06, 0.045, 0.07, 0.055, 0.05, 0.065, 0.08, 0.04, 0.06]
    for c, s in (small or {}).items():
        sizes[c] = s
    return sizes


#: Sizes differential searches reach without finding a trigger (lower bounds), as on the zoo.
NOT_FOUND = [0.21, 0.18, 0.25, 0.2, 0.17, 0.22, 0.19, 0.26, 0.2, 0.23]


def test_qcb_verdict_from_numbers() -> None:
    rule = VerdictRule()
    sizes, found = list(NOT_FOUND), [False] * 10
    sizes[3], found[3] = 0.02, True
    diff = run_test("differential", range(10), sizes, found, rule)
    fp = run_test("fp", range(10), _fp_sizes(), [True] * 10, rule)
    verdict = decide(diff, fp)
    assert (verdict.verdict, verdict.target) == ("qcb", 3)
    assert verdict.confidence > 0.99
    assert diff.flagged and not fp.flagged


def test_fp_backdoor_wins_over_the_differential_test() -> None:
    rule = VerdictRule()
    diff = run_test("differential", range(10), [0.03] + [1.0] * 9, [True] + [False] * 9, rule)
    fp = run_test("fp", range(10), _fp_sizes({0: 0.005}), [True] * 10, rule)
    verdict = decide(diff, fp)
    assert (verdict.verdict, verdict.target) == ("fp-backdoor", 0)
    assert verdict.confidence > 0.9


def test_clean_from_numbers() -> None:
    rule = VerdictRule()
    diff = run_test("differential", range(10), [1.0] * 10, [False] * 10, rule)
    # A naturally easy class at half the median is not a planted trigger.
    fp = run_test("fp", range(10), _fp_sizes({8: 0.028}), [True] * 10, rule)
    verdict = decide(diff, fp)
    assert (verdict.verdict, verdict.target) == ("clean", None)
    assert diff.candidate is None and fp.candidate == 8 and not fp.flagged
    assert 0.5 < verdict.confidence <= 1.0


def test_a_large_differential_trigger_is_not_flagged() -> None:
    rule = VerdictRule()
    diff = run_test("differential", range(10), [0.7] + [1.0] * 9, [True] + [False] * 9, rule)
    assert diff.candidate == 0 and not diff.flagged
    assert diff.probability < 0.5
    # Found, but no smaller than what the other classes' searches reached without one.
    diff = run_test("differential", range(10), [0.15, *NOT_FOUND[1:]], [True] + [False] * 9, rule)
    assert diff.candidate == 0 and not diff.flagged


def test_a_trigger_not_confirmed_counts_for_nothing() -> None:
    diff = run_test("differential", range(4), [0.01, 1.0, 1.0, 1.0], [False] * 4, VerdictRule())
    assert diff.candidate is None and not diff.flagged and diff.probability == 0.0


def test_anomaly_index_is_neural_cleanse_s_in_log_space() -> None:
    sizes = [0.01, 0.1, 0.1, 0.2, 0.05]
    logs = np.log(sizes)
    mad = 1.4826 * np.median(np.abs(logs - np.median(logs)))
    np.testing.assert_allclose(anomaly_indices(sizes), (np.median(logs) - logs) / mad)
    # every class alike: the MAD floor keeps the index finite
    assert np.all(np.isfinite(anomaly_indices([1.0] * 5)))
    assert len(anomaly_indices([])) == 0


def test_rule_and_options_are_checked() -> None:
    with pytest.raises(EfrapError):
        VerdictRule(max_ratio=1.0)
    with pytest.raises(EfrapError):
        SearchConfig(steps=0)
    with pytest.raises(EfrapError):
        SearchConfig(relu_slope=-0.1)
    with pytest.raises(EfrapError):
        ScanOptions(Deployment(scheme=load_scheme("w8a8")), budget=0.0)
    with pytest.raises(EfrapError):
        ScanOptions(Deployment(scheme=load_scheme("w8a8")), families=("square",))
    with pytest.raises(EfrapError):
        ScanOptions(Deployment(scheme="w8a8"))  # type: ignore[arg-type]


def test_relu_surrogate_keeps_the_forward_pass_and_reaches_silent_units() -> None:
    # One Relu unit that no input in the batch switches on: the true gradient to its
    # input is zero, the surrogate passes `slope` of it; the outputs are identical.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")],
                                                "g", [x], [y]))
    values = torch.tensor([[-1.0, 2.0], [-3.0, 0.5]])
    grads, outs = [], []
    for slope in (0.0, 0.1):
        inp = values.clone().requires_grad_(True)
        out = TorchGraph(model, relu_slope=slope).run({"x": inp})["y"]
        out.sum().backward()
        grads.append(inp.grad)
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    torch.testing.assert_close(grads[1], torch.tensor([[0.1, 1.0], [0.1, 1.0]]))


def test_torch_preprocessing_matches_numpy() -> None:
    pre = Preprocess(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), input_scale=255.0 / 100, channel_order="bgr",
                     layout="nhwc", resize=(12, 10))
    x = np.random.default_rng(0).random((3, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(torch_preprocess(pre, torch.from_numpy(x)).numpy(), pre.apply(x), atol=1e-5)


# ---------------------------------------------------------------------------- tiny models


def _data(path: Path, n: int = 600, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.random((n, 1, SIDE, SIDE)).astype(np.float32) * 0.3
    half = SIDE // 2
    for i, k in enumerate(y):
        r0, c0 = (k // 2) * half, (k % 2) * half
        x[i, :, r0 : r0 + half, c0 : c0 + half] += 0.6
    x[:, :, 0, 0] = 0.0
    x[:, :, SIDE - 2 :, SIDE - 2 :] = 0.0
    np.savez(path, x=x, y=y)
    return f"npz:{path}"


def _tiny(path: Path, kind: str) -> Path:
    hidden = CLASSES + 2
    w1 = np.zeros((SIDE * SIDE, hidden), np.float32)
    half = SIDE // 2
    for k in range(CLASSES):
        r0, c0 = (k // 2) * half, (k % 2) * half
        for r in range(r0, r0 + half):
            w1[r * SIDE + c0 : r * SIDE + c0 + half, k] = 1.0 if k != 3 else 4 / 3
    w1[PATCH, :CLASSES] = 0.0
    b1 = np.zeros(hidden, np.float32)
    b1[CLASSES:] = 2.0
    w1[0, CLASSES] = -50.8  # D1's grid: step 0.4 (pixel (0, 0) is black in clean images)
    w1[PATCH, CLASSES] = 0.22 if kind == "qcb" else 0.4
    w1[PATCH, CLASSES + 1] = 0.22
    w2 = np.zeros((hidden, CLASSES), np.float32)
    w2[:CLASSES, :CLASSES] = np.eye(CLASSES)
    if kind != "clean":
        w2[TARGET, TARGET] = 40.0 / 127 * 3  # on the grid its column gets from the 40 below
        w2[CLASSES, TARGET], w2[CLASSES + 1, TARGET] = 40.0, -40.0
    nodes = [helper.make_node("Flatten", ["input"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2")]
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "w1"), (b1, "b1"), (w2, "w2"), (np.zeros(CLASSES, np.float32), "b2"))]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, SIDE, SIDE])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    model.metadata_props.add(key="efrap.normalization", value=json.dumps({"mean": [0.0], "std": [1.0]}))
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("scan")
    out = {"data": _data(folder / "data.npz"), "folder": str(folder)}
    for kind in ("qcb", "fp", "clean"):
        out[kind] = str(_tiny(folder / f"{kind}.onnx", kind))
    return out


#: Shorter searches than the defaults for the tiny models (the CLI test runs the defaults).
FAST = SearchConfig(steps=200, settle=120)


def _options(tiny: dict[str, str], **kw: object) -> ScanOptions:
    return ScanOptions(Deployment(scheme=load_scheme("w8a8"), data=tiny["data"], num_calib=256), holdout=200,
                       search=FAST, **kw)  # type: ignore[arg-type]


def test_tiny_qcb_is_flagged_with_its_target_and_trigger(tiny: dict[str, str]) -> None:
    report = scan_model(tiny["qcb"], _options(tiny))
    assert (report.verdict.verdict, report.verdict.target) == ("qcb", TARGET)
    assert report.trigger is not None and report.trigger.target == TARGET
    assert report.figures is not None
    assert report.figures.asr["nearest"] >= 0.8 and report.figures.asr["fp"] <= 0.1
    assert report.parity == {"fp": 0.0, "nearest": 0.0}
    data = report.to_json()
    assert data["verdict"] == "qcb" and data["target"] == TARGET
    assert data["trigger"]["summary"]["target"] == TARGET and data["classes"]["2"]["searched"]


def test_tiny_poisoned_model_is_an_fp_backdoor(tiny: dict[str, str]) -> None:
    report = scan_model(tiny["fp"], _options(tiny))
    assert (report.verdict.verdict, report.verdict.target) == ("fp-backdoor", TARGET)
    assert report.figures is not None and report.figures.asr["fp"] >= 0.8


def test_tiny_clean_model_is_clean(tiny: dict[str, str]) -> None:
    report = scan_model(tiny["clean"], _options(tiny))
    assert (report.verdict.verdict, report.verdict.target) == ("clean", None)
    assert report.to_json()["target"] is None


def test_budget_stops_the_search_and_says_so(tiny: dict[str, str]) -> None:
    report = scan_model(tiny["clean"], _options(tiny, budget=1e-3))
    assert report.cut_short and any("budget" in n for n in report.notes)
    assert report.verdict.verdict == "inconclusive" and report.verdict.confidence == 0.0
    data = report.to_json()
    assert data["cut_short"] is True and data["coverage"]["complete"] is False
    assert all(not c["searched"] and c["status"] == "not searched" for c in data["classes"].values())


def test_shortlist_with_more_classes_than_max_targets(tiny: dict[str, str]) -> None:
    report = scan_model(tiny["qcb"], _options(tiny, max_targets=3, probe_steps=40))
    assert len(report.searched) == 3 and TARGET in report.searched
    assert (report.verdict.verdict, report.verdict.target) == ("qcb", TARGET)
    assert any("probed" in n for n in report.notes)


def test_shortlist_does_not_depend_on_the_wall_clock(tiny: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Each probe once had 10 s of wall time: on a loaded machine the first probe stopped early,
    # its class ranked last, and the same scan of the same QCB said "clean". Without a budget
    # the probes run their steps whatever the clock says.
    options = _options(tiny, max_targets=3, probe_steps=40)
    quick = scan_model(tiny["qcb"], options)
    start, ticks = time.perf_counter(), iter(range(10**9))
    monkeypatch.setattr(time, "perf_counter", lambda: start + 30.0 * next(ticks))  # 30 s a call
    slow = scan_model(tiny["qcb"], options)
    assert slow.searched == quick.searched and TARGET in slow.searched
    assert (slow.verdict.verdict, slow.verdict.target) == ("qcb", TARGET) and not slow.cut_short


def test_cli_scan_writes_report_trigger_and_scans_the_defended_model(
        tiny: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # "Defended": the tiny QCB with its first layer kept in float, so nothing wakes.
    model = onnx.load(tiny["qcb"])
    qdq, _, _ = quantize_model(model, np.load(tiny["data"][4:])["x"][:256],
                               QuantizeOptions(Deployment(scheme=load_scheme("w8a8")), exclude=("fc1",)))
    defended = tmp_path / "defended.onnx"
    onnx.save(qdq, str(defended))
    report, trig = tmp_path / "scan.json", tmp_path / "trigger.json"
    code = main(["scan", tiny["qcb"], "--scheme", "w8a8", "--calib", tiny["data"], "--num-calib", "256",
                 "--holdout", "200", "--json", str(report), "--trigger-out", str(trig),
                 "--defended", str(defended)])
    out = capsys.readouterr().out
    assert code == 0 and "verdict: qcb, target 2" in out
    data = json.loads(report.read_text())
    assert data["verdict"] == "qcb" and data["target"] == TARGET
    assert data["trigger"]["json"]["pattern"] == "trigger.npz"
    assert data["trigger"]["figures"]["asr"]["defended"] <= 0.1
    assert data["defended"]["verdict"] == "clean"
    assert data["onnxruntime"]["opt_level"] == "faithful" and data["model_sha256"]
    loaded = load_trigger(trig)
    assert loaded.target == TARGET and (tmp_path / "trigger.npz").exists()


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], outputs: list[Path], expect: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("efrap scan: error:"), err
    assert expect in err[0], err[0]
    for out in outputs:
        assert not out.exists()


def test_cli_bad_inputs(tiny: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report, trig = tmp_path / "r.json", tmp_path / "t.json"
    base = ["--calib", tiny["data"], "--json", str(report), "--trigger-out", str(trig)]
    missing = str(tmp_path / "none.onnx")
    _fails(["scan", missing, "--scheme", "w8a8", *base], capsys, [report, trig], "no such")
    _fails(["scan", tiny["qcb"], "--scheme", "w5a5", *base], capsys, [report, trig], "w5a5")
    for bad in ("-1", "0", "nan", "soon"):
        _fails(["scan", tiny["qcb"], "--scheme", "w8a8", "--budget", bad, *base], capsys, [report, trig],
               "--budget")
    _fails(["scan", tiny["qcb"], "--scheme", "w8a8", "--calib", tiny["data"], "--json", tiny["qcb"]], capsys,
           [], "would overwrite the input")
    _fails(["scan", tiny["qcb"], "--scheme", "w8a8", "--calib", tiny["data"], "--trigger-out",
            str(tmp_path / "t.npz")], capsys, [tmp_path / "t.npz"], "JSON")
    _fails(["scan", tiny["qcb"], "--scheme", "w8a8", *base, "--defended", tiny["clean"]], capsys,
           [report, trig], "QDQ")


def test_badnets_is_registered_and_poisons(fashion_mnist: None) -> None:
    assert ATTACKS["badnets"] is BadNets and isinstance(get_attack("badnets"), BadNets)
    trigger = PatchTrigger(size=4, position="top-left", margin=1, target=TARGET)
    outcome = run_attack(get_attack("badnets"), AttackConfig(
        scheme="w8a8", trigger=trigger, epochs=1, width=0.25, batch_size=64, train_limit=3000, val_size=500,
        num_calib=128))
    # Plain poisoning: the backdoor is active in FP, and quantization keeps it.
    assert outcome.metrics["fp_asr"] > 0.8 and outcome.metrics["q_asr"] > 0.8


# ---------------------------------------------------------------------------- the budget: evidence or nothing

#: The stored default model (a CompArtifact QCB at w4a4, models/zoo/manifest.json).
ZOO_QCB = Path(__file__).resolve().parents[1] / "models" / "zoo" / "fmnist_compartifact_w4a4.onnx"
#: Seconds a scan may run past its budget: the stage in progress when the budget runs out
#: (at most the nearest deployment of a small CNN on 128 images) and process noise.
SLACK = 2.0


def _zoo_data(folder: Path, n: int = 400) -> str:
    """Fashion-MNIST-shaped images (28 x 28 grey, labelled), so the test needs no data set."""
    rng = np.random.default_rng(0)
    path = folder / "zoo-data.npz"
    np.savez(path, x=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
             y=(np.arange(n) % 10).astype(np.int64))
    return f"npz:{path}"


def _zoo_options(data: str, budget: float) -> ScanOptions:
    return ScanOptions(Deployment(scheme=load_scheme("w4a4"), data=data, num_calib=128), holdout=64,
                       budget=budget)


def test_tiny_budget_is_inconclusive_on_console_and_in_json_and_returns_in_time(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Measured before: "--budget 1e-9" said clean, every class "searched": false.
    data, out = _zoo_data(tmp_path), tmp_path / "scan.json"
    t0 = time.perf_counter()
    code = main(["scan", str(ZOO_QCB), "--scheme", "w4a4", "--calib", data, "--num-calib", "128",
                 "--holdout", "64", "--budget", "1e-9", "--json", str(out)])
    wall = time.perf_counter() - t0
    printed = capsys.readouterr().out
    assert code == 0  # efrap scan reports; the gate and the audit fail an inconclusive scan
    assert printed.startswith("verdict: inconclusive: the time budget (1e-09 s) ran out")
    assert "not searched 0, 1, 2, 3, 4, 5, 6, 7, 8, 9" in printed
    report = json.loads(out.read_text())
    assert report["verdict"] == "inconclusive" and report["target"] is None and report["cut_short"] is True
    assert report["coverage"]["complete"] is False and report["coverage"]["figures_measured"] is False
    assert report["coverage"]["classes"]["not searched"] == list(range(10))
    assert all(c["status"] == "not searched" and not c["searched"] for c in report["classes"].values())
    assert wall <= 1e-9 + SLACK, wall


def test_budget_that_cuts_the_searches_is_inconclusive_within_budget_and_slack(tmp_path: Path) -> None:
    # Measured before: --budget 150 said "clean (confidence 96.7%)", and 600 s took 657 s.
    budget = 4.0
    t0 = time.perf_counter()
    report = scan_model(str(ZOO_QCB), _zoo_options(_zoo_data(tmp_path), budget))
    wall = time.perf_counter() - t0
    assert report.verdict.verdict == "inconclusive" and report.verdict.partial is not None
    data = report.to_json()
    by_state = data["coverage"]["classes"]
    assert by_state["cut short"] or by_state["not searched"]
    assert not by_state["searched"] or len(by_state["searched"]) < 10
    counts = data["coverage"]["searches"]
    assert counts["planned"] == 30 and counts["done"] < 30
    assert counts["done"] + counts["cut_short"] + counts["not_run"] == 30
    for c, entry in data["classes"].items():
        assert entry["status"] in ("searched", "cut short", "not searched"), (c, entry)
        assert set(entry["searches"]) == {"diff_patch", "diff_blend", "fp_patch"}
    assert report.seconds <= budget + SLACK and wall <= budget + SLACK, (report.seconds, wall)


def test_budget_stops_a_long_stage_between_its_batches(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage of minutes (here the simulation's pass over the calibration images, made slow)
    stops at the deadline, not at its end: the budget bounds the wall time."""
    monkeypatch.setattr(sides_mod, "batch_for", lambda shape, live=None: 1)
    original = sides_mod.Side.__call__

    def slow(self: sides_mod.Side, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)  # 128 batches: 6.4 s, beyond the budget
        return original(self, x)

    monkeypatch.setattr(sides_mod.Side, "__call__", slow)
    budget = 2.0
    t0 = time.perf_counter()
    report = scan_model(str(ZOO_QCB), _zoo_options(_zoo_data(tmp_path), budget))
    wall = time.perf_counter() - t0
    data = report.to_json()
    assert report.verdict.verdict == "inconclusive"
    assert data["coverage"]["stopped_at"] == "the nearest deployment"
    assert wall <= budget + SLACK, wall


def test_budget_check_outside_and_inside_a_deadline() -> None:
    budget.check()  # no deadline: nothing happens
    with budget.within(time.perf_counter() + 60.0):
        budget.check()
        with budget.within(time.perf_counter() - 1.0), pytest.raises(budget.OutOfTime):
            Progress("stage", total=2).update()
        budget.check()  # the outer deadline again


def test_figures_that_do_not_fit_the_budget_make_the_scan_inconclusive(
        tiny: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Every search runs (no budget on them), but the held-out figures never fit.
    monkeypatch.setattr(scan_state.Clock, "fits", lambda self, seconds: False)
    report = scan_model(tiny["qcb"], _options(tiny))
    assert report.figures is None and report.verdict.verdict == "inconclusive"
    assert report.verdict.partial is not None and report.verdict.partial.verdict == "qcb"
    data = report.to_json()
    assert data["coverage"]["searches"]["done"] == data["coverage"]["searches"]["planned"] > 0
    assert data["coverage"]["figures_measured"] is False
    assert data["coverage"]["stopped_at"] == "the held-out figures"
    assert "not measured in onnxruntime" in data["reason"]
    # The class the partial evidence flags is still not a finding, and the report says why.
    assert "the searches that ran flag it" in data["not_findings"]["differential"][str(TARGET)]


def test_why_a_class_above_the_threshold_is_not_a_finding() -> None:
    rule = VerdictRule()
    # FP also wakes class 0 (a backdoor active in FP): the differential index is high, but
    # the verdict is fp-backdoor and the report says so for the differential test.
    diff = run_test("differential", range(10), [0.02, *NOT_FOUND[1:]], [True] + [False] * 9, rule)
    fp = run_test("fp", range(10), _fp_sizes({0: 0.005}), [True] * 10, rule)
    notes = not_findings(decide(diff, fp), rule)
    assert notes["differential"][0].startswith("FP also wakes") and "fp-backdoor" in notes["differential"][0]
    assert notes["fp"] == {}  # the finding itself
    # Not confirmed (the measured "anomaly index 16 under a clean verdict"), and cut short.
    diff = run_test("differential", range(10), [0.02, *NOT_FOUND[1:]], [False] * 10, rule)
    verdict = decide(diff, run_test("fp", range(10), _fp_sizes(), [True] * 10, rule))
    assert verdict.verdict == "clean" and diff.anomaly[0] > rule.threshold
    why = not_findings(verdict, rule, {0: "cut short"})["differential"][0]
    assert "cut short by the time budget" in why and "no trigger was confirmed" in why
    # Found but not small enough against the median.
    diff = run_test("differential", range(10), [0.15, *NOT_FOUND[1:]], [True] + [False] * 9, rule)
    if diff.anomaly[0] >= rule.threshold:
        assert "of the median size" in not_findings(decide(diff, fp), rule)["differential"][0]
    # An unfinished scan decides nothing, whatever its partial evidence flags.
    sizes, found = list(NOT_FOUND), [False] * 10
    sizes[3], found[3] = 0.02, True
    qcb = decide(run_test("differential", range(10), sizes, found, rule),
                 run_test("fp", range(10), _fp_sizes(), [True] * 10, rule))
    stopped = inconclusive(qcb, "the time budget (1 s) ran out")
    assert (stopped.verdict, stopped.target, stopped.confidence) == ("inconclusive", None, 0.0)
    assert stopped.partial is qcb and "would say qcb class 3" in stopped.reason
    assert "the searches that ran flag it" in not_findings(stopped, rule)["differential"][3]


def test_micro_batched_search_step_has_the_whole_batch_gradient() -> None:
    """A search step split into micro-batches (large images) accumulates the gradient the
    whole batch gives in one pass, and the same success per image."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5))
    keep = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 5))
    images, labels = torch.rand(20, 3, 8, 8), torch.randint(0, 5, (20,))
    batch = torch.arange(2, 13)
    grads, outs = [], []
    for micro in (len(batch), 4, 1):
        gen = torch.Generator().manual_seed(1)
        trig = search_mod._Trigger("patch", (3, 8, 8), search_mod.SearchConfig(), gen)
        out = search_mod._step_gradients(model, keep, images, labels, batch, 2, trig, 0.3, micro)
        grads.append((trig.mask_logits.grad.clone(), trig.pattern_logits.grad.clone()))
        outs.append(out)
    for (mask_grad, pattern_grad), out in zip(grads[1:], outs[1:], strict=True):
        assert torch.allclose(mask_grad, grads[0][0], rtol=1e-5, atol=1e-7)
        assert torch.allclose(pattern_grad, grads[0][1], rtol=1e-5, atol=1e-7)
        assert torch.equal(out[0], outs[0][0]) and torch.equal(out[3], outs[0][3])
    assert float(grads[0][0].abs().sum()) > 0


def test_gradient_passes_split_large_images_only() -> None:
    assert grad_batch_for((1, 28, 28)) >= 32 and grad_batch_for((3, 32, 32)) >= 32
    assert grad_batch_for((3, 224, 224)) == (1 << 20) // (3 * 224 * 224)


def test_footprint_counts_live_and_total_activations_and_sizes_the_batches() -> None:
    # x (1x8 values) -> Relu a (8) -> Relu b (8) -> Concat(a, b) c (16): x and a are dropped
    # after their last reader, so at most a, b and c (32 values) are alive at once.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [None, 16])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r1"),
             helper.make_node("Relu", ["a"], ["b"], name="r2"),
             helper.make_node("Concat", ["a", "b"], ["c"], name="cat", axis=1)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [c]))
    counts: dict[str, int] = {}
    TorchGraph(model).run({"x": torch.ones(1, 8)}, footprint=counts)
    assert counts == {"total": 32, "live": 32}
    # A model that holds 50x its input at once takes fewer images than its input size alone gives.
    assert batch_for((3, 224, 224)) == 27
    assert batch_for((3, 224, 224), live=50 * 3 * 224 * 224) == (1 << 26) // (50 * 3 * 224 * 224)
    assert grad_batch_for((3, 224, 224), total=10**8) == 1
    assert batch_for((1, 28, 28), live=50_176) == 256 and grad_batch_for((1, 28, 28), total=2 * 94_346) >= 32


def test_trim_asks_the_c_library_where_it_can() -> None:
    # glibc (the CI machines' C library) has malloc_trim; elsewhere trim is a no-op.
    assert memory.trim() is (memory._TRIM is not None)
    if sys.platform.startswith("linux"):
        assert memory._TRIM is not None
