"""The trigger-guided repair: the gap rule on a hand-built model with a planted outlier unit, the
pruning of exactly its readers, and the self-check shipping a repaired candidate (stand-in scan)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.audit import AuditThresholds, FlaggingTrigger, flagging_triggers
from pipeline.base.data import Dataset
from pipeline.base.deployment import Deployment
from pipeline.base.errors import EfrapError
from pipeline.base.preprocess import PreparedImages, Preprocess
from pipeline.base.runtime import make_session
from pipeline.base.scheme import PRESETS
from pipeline.base.trigger import PatternTrigger
from pipeline.qdq_weights import stored_weights
from pipeline.quantize import GuardOptions, QuantizeOptions
from pipeline.repair import RepairSettings, outlier_units, reading_mask, repair_model
from pipeline.scan.report import ScanReport
from pipeline.scan_evidence import evidence_from_scan
from pipeline.selfcheck import SelfCheckOptions, self_checking_defend
from tests.conftest import export_tiny
from tests.scan_reports import found
from tests.test_audit import CASES

#: The hand-built model: a 1 x 6 x 6 input, flattened into a Gemm of 36 features to 6 units,
#: Relu, a Gemm to 3 classes. The input grid ends at 0.5: a pixel above it is clipped in the
#: deployed model and not in FP; the trigger sets pixel PLANTED to 1.0.
SIZE, PLANTED, INPUT_MAX = 6, 15, 0.5
FC1_ZP = np.array([3, -2, 0, 1, 4, -1], np.int8)


def _qdq(name: str) -> list[onnx.NodeProto]:
    return [helper.make_node("QuantizeLinear", [name, f"{name}_s", f"{name}_z"], [f"{name}_q"],
                             name=f"{name}_ql"),
            helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"],
                             name=f"{name}_dql")]


def _models(folder: Path) -> tuple[Path, Path]:
    """The FP model and its QDQ model (the same weights: only the activations are rounded)."""
    rng = np.random.default_rng(0)
    w1 = rng.integers(-60, 60, (6, SIZE * SIZE)).astype(np.int8) + FC1_ZP.reshape(-1, 1)
    s1 = np.full(6, 0.01, np.float32)
    w2 = rng.integers(-100, 100, (6, 3)).astype(np.int8)
    s2 = np.array(0.02, np.float32)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 1, SIZE, SIZE])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3])
    fp = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["f"], name="flat"),
         helper.make_node("Gemm", ["f", "w1"], ["h"], name="fc1", transB=1),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "w2"], ["logits"], name="fc2")],
        "fp", [x], [y],
        [numpy_helper.from_array((w1.astype(np.float32) - FC1_ZP.reshape(-1, 1)) * s1.reshape(-1, 1), "w1"),
         numpy_helper.from_array(w2.astype(np.float32) * s2, "w2")])
    inits = [numpy_helper.from_array(np.array(INPUT_MAX / 255, np.float32), "input_s"),
             numpy_helper.from_array(np.array(0, np.uint8), "input_z"),
             numpy_helper.from_array(np.array(0.02, np.float32), "r_s"),
             numpy_helper.from_array(np.array(0, np.uint8), "r_z"),
             numpy_helper.from_array(w1, "w1_q"), numpy_helper.from_array(s1, "w1_s"),
             numpy_helper.from_array(FC1_ZP, "w1_z"), numpy_helper.from_array(w2, "w2_q"),
             numpy_helper.from_array(s2, "w2_s"), numpy_helper.from_array(np.array(0, np.int8), "w2_z")]
    q = helper.make_graph(
        [*_qdq("input"), helper.make_node("Flatten", ["input_dq"], ["f"], name="flat"),
         helper.make_node("DequantizeLinear", ["w1_q", "w1_s", "w1_z"], ["w1_dq"], name="w1_dql", axis=0),
         helper.make_node("Gemm", ["f", "w1_dq"], ["h"], name="fc1", transB=1),
         helper.make_node("Relu", ["h"], ["r"], name="relu"), *_qdq("r"),
         helper.make_node("DequantizeLinear", ["w2_q", "w2_s", "w2_z"], ["w2_dq"], name="w2_dql"),
         helper.make_node("Gemm", ["r_dq", "w2_dq"], ["logits"], name="fc2")],
        "qdq", [x], [y], inits)
    paths = folder / "fp.onnx", folder / "q.onnx"
    for graph, path in zip((fp, q), paths, strict=True):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        model.ir_version = 10
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    return paths


def _images(n: int = 64) -> PreparedImages:
    raw = np.random.default_rng(1).uniform(0.0, INPUT_MAX, (n, 1, SIZE, SIZE)).astype(np.float32)
    data = Dataset("planted", raw, np.zeros(n, np.int64), 3)
    return PreparedImages(data, np.arange(n), Preprocess(mean=(0.0,), std=(1.0,)))


def _trigger() -> FlaggingTrigger:
    """Pixel PLANTED at 1.0 (twice the input grid's end), and a faint corner inside the grid."""
    mask = np.zeros((1, SIZE, SIZE), np.float32)
    pattern = np.zeros_like(mask)
    mask[0, :2, :2], pattern[0, :2, :2] = 0.5, 0.2
    mask.reshape(-1)[PLANTED], pattern.reshape(-1)[PLANTED] = 1.0, 1.0
    return FlaggingTrigger("recovered", PatternTrigger(pattern=pattern, target=0, mask=mask), 0.9, 0.0)


def test_the_gap_rule_picks_the_planted_unit_and_zeroes_exactly_its_readers(tmp_path: Path) -> None:
    fp_path, q_path = _models(tmp_path)
    repaired, record = repair_model(str(fp_path), str(q_path), (_trigger(),), _images(), RepairSettings())
    assert record.judged == 1 and record.images == 64
    assert any("fc2: 6 units" in note for note in record.notes), "6 units: too few to judge"
    assert [(layer.node, layer.pruned) for layer in record.layers] == [("fc1", (PLANTED,))]
    assert record.layers[0].ratios[0] > 100 and record.layers[0].median_ratio < 2
    before = {w.node: w.q for w in stored_weights(onnx.load(str(q_path)))}
    after = {w.node: w.q for w in stored_weights(repaired)}
    assert np.array_equal(after["fc2"], before["fc2"])
    readers = np.zeros(before["fc1"].shape, bool)
    readers[:, PLANTED] = True  # transB: column PLANTED of every row
    assert np.array_equal(after["fc1"][~readers], before["fc1"][~readers])
    assert np.array_equal(after["fc1"][:, PLANTED], FC1_ZP)
    assert record.layers[0].zeroed == int((before["fc1"][:, PLANTED] != FC1_ZP).sum())
    # The pruned model no longer reads the unit at all.
    session = make_session(repaired)
    x = np.asarray(_images(8)[:])
    y = x.copy()
    y.reshape(8, -1)[:, PLANTED] = 0.3
    assert np.array_equal(session.run(x), session.run(y))
    assert not np.array_equal(make_session(onnx.load(str(q_path))).run(x)[:, :], session.run(x))
    # Deterministic: the same inputs give the same bytes.
    again, _ = repair_model(str(fp_path), str(q_path), (_trigger(),), _images(), RepairSettings())
    assert again.SerializeToString() == repaired.SerializeToString()
    assert json.dumps(record.to_json())  # JSON-ready


def test_outlier_units_threshold_cap_and_small_layers() -> None:
    rng = np.random.default_rng(0)
    base = np.exp(rng.normal(0.0, 0.05, 40))
    planted = base.copy()
    planted[[5, 17, 30]] = [50.0, 9.0, 3.0]
    rule = RepairSettings()
    assert outlier_units(planted, rule).tolist() == [5, 17], "3.0 is an outlier but below the 4x minimum"
    assert outlier_units(planted, RepairSettings(max_share=0.03)).tolist() == [5], "capped: largest first"
    assert outlier_units(base, rule).tolist() == []
    assert outlier_units(base * 10.0, rule).tolist() == [], "a whole layer 10x apart is no outlier"
    assert outlier_units(planted[:7], rule).tolist() == [], "fewer than 8 units are not judged"
    with pytest.raises(EfrapError):
        RepairSettings(min_ratio=0.5)
    with pytest.raises(EfrapError):
        RepairSettings(max_share=0.0)


def test_reading_mask_of_each_layout() -> None:
    units = np.array([1])
    gemm_t = helper.make_node("Gemm", ["a", "b"], ["c"], transB=1)
    assert np.flatnonzero(reading_mask(gemm_t, (3, 4), units).any(axis=0)).tolist() == [1]
    gemm = helper.make_node("Gemm", ["a", "b"], ["c"])
    assert reading_mask(gemm, (4, 3), units)[1].all() and reading_mask(gemm, (4, 3), units).sum() == 3
    matmul = helper.make_node("MatMul", ["a", "b"], ["c"])
    assert reading_mask(matmul, (4, 3), units)[1].all()
    depthwise = helper.make_node("Conv", ["a", "b"], ["c"], group=4)
    mask = reading_mask(depthwise, (4, 1, 3, 3), units)
    assert mask[1].all() and mask.sum() == 9
    grouped = helper.make_node("Conv", ["a", "b"], ["c"], group=2)  # 8 in-channels, 4 per group
    mask = reading_mask(grouped, (6, 4, 3, 3), np.array([5]))
    assert mask[3:6, 1].all() and mask.sum() == 27, "channel 5: group 1's outputs 3-5, their in-channel 1"


def _patch() -> PatternTrigger:
    mask = np.zeros((1, 28, 28), np.float32)
    mask[0, 20:, 20:] = 1.0
    return PatternTrigger(pattern=np.ones((1, 28, 28), np.float32), target=0, mask=mask)


def _with_trigger(report: ScanReport) -> ScanReport:
    """The report with a recovered trigger (its arrays) for the FP model."""
    return replace(report, trigger=_patch(), trigger_found=found(0))


def _without_fresh_trigger(report: ScanReport) -> ScanReport:
    """The report whose fresh search against Q kept no trigger (its class still flagged)."""
    assert report.defended is not None
    return replace(report, defended=replace(report.defended, own_trigger=None))


def test_flagging_triggers_follow_the_verdict() -> None:
    flagged = _with_trigger(CASES["qcb"])
    triggers = flagging_triggers(flagged, evidence_from_scan(flagged), AuditThresholds())
    assert [t.source for t in triggers] == ["recovered", "fresh"]
    assert [t.asr_quantized for t in triggers] == [pytest.approx(0.97), pytest.approx(0.96)]
    unflagged = _with_trigger(CASES["clean"])
    assert flagging_triggers(unflagged, evidence_from_scan(unflagged), AuditThresholds()) == ()
    bare = _without_fresh_trigger(CASES["qcb"])
    assert flagging_triggers(bare, evidence_from_scan(bare), AuditThresholds()) == (), "no arrays, no trigger"


@pytest.mark.usefixtures("fashion_mnist")
def test_self_check_ships_the_repaired_candidate(tmp_path: Path) -> None:
    tiny = export_tiny(tmp_path / "tiny.onnx")
    qcb, clean = CASES["qcb"], CASES["clean"]
    # The recovered trigger alone guides the repair, as with the stand-in this test had before.
    reports = {"default": _without_fresh_trigger(_with_trigger(qcb)), "default+repair": clean}
    calls: list[str] = []

    def scan(model: str, options: object, defended: str | None = None) -> ScanReport:
        assert defended is not None
        calls.append(Path(defended).stem)
        return reports[Path(defended).stem]

    options = QuantizeOptions(Deployment(scheme=PRESETS["w4a4"], num_calib=64, seed=0), method="efrap",
                              device="cpu")
    # A lenient rule (any unit above its layer's median): the untrained tiny model has no planted unit.
    lenient = RepairSettings(images=64, min_ratio=1.0, z_threshold=0.0)
    check = SelfCheckOptions(candidates=("default", "adaround"), iters=20, repair=lenient)
    out = tmp_path / "out.onnx"
    outcome = self_checking_defend(str(tiny), str(out), options, GuardOptions(images=100), check, scan,
                                   resume=False)
    assert calls == ["default", "default+repair"], "the repair comes right after the candidate it repairs"
    assert outcome.passed and outcome.shipped == "default+repair"
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["efrap.method"] == "efrap"
    doc = json.loads(meta["efrap.self_check"])
    assert [c["name"] for c in doc["candidates"]] == ["default", "default+repair"]
    assert doc["candidates"][0]["repair"] is None
    repair = doc["candidates"][1]["repair"]
    assert repair["pruned_units"] > 0 and repair["triggers"][0]["source"] == "recovered"
    assert json.loads(meta["efrap.repair"])["layers"] == repair["layers"]
    # The shipped integers read none of the pruned units.
    shipped = onnx.load(str(out))
    nodes = {n.name: n for n in shipped.graph.node}
    weights = {w.node: w for w in stored_weights(shipped)}
    for layer in repair["layers"]:
        w = weights[layer["node"]]
        mask = reading_mask(nodes[layer["node"]], w.q.shape, np.array(layer["pruned"]))
        zp = w.zero_point.reshape([-1 if i == w.axis else 1 for i in range(w.q.ndim)]) if w.per_channel \
            else w.zero_point
        assert (w.q == np.broadcast_to(zp, w.q.shape))[mask].all()
    assert json.loads(meta["efrap.guard"])["images"] == 100
