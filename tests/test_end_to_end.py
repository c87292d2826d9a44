"""End to end on the stored default model and the real Fashion-MNIST test set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
import pytest

from models.zoo import load_manifest, zoo_path
from pipeline.base.runtime import make_session
from pipeline.cli.main import main


@pytest.fixture
def clean_model(fashion_mnist: None) -> Path:
    entry = next(e for e in load_manifest() if e.kind == "clean")
    return zoo_path(entry)


def _verify(model: Path, tmp: Path, *extra: str) -> dict:
    out = tmp / f"{model.stem}.json"
    assert main(["verify", str(model), "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_nearest_w8a8_keeps_accuracy_and_fuses(clean_model: Path, tmp_path: Path) -> None:
    fp = _verify(clean_model, tmp_path)
    q = tmp_path / "w8a8.onnx"
    assert main(["quantize", str(clean_model), "--scheme", "w8a8", "-o", str(q)]) == 0
    report = _verify(q, tmp_path, "--reference")
    assert report["images"] == 10_000 and report["opt_level"] == "faithful"
    assert report["provider"] == "CPUExecutionProvider"
    assert fp["clean_accuracy"] - report["clean_accuracy"] <= 0.01
    assert report["parity"]["fraction_differing_predictions"] <= 0.002
    assert report["parity"]["max_logit_gap"] < 0.05
    optimized = tmp_path / "optimized.onnx"
    make_session(onnx.load(str(q)), "all", "cpu", optimized_path=str(optimized))
    assert Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)["QLinearConv"] >= 1


def test_verify_reads_a_warp_trigger(clean_model: Path, tmp_path: Path) -> None:
    warp = Path(__file__).resolve().parents[1] / "models/zoo/triggers/warp_g4_s1_seed7_t2.json"
    report = _verify(clean_model, tmp_path, "--trigger", str(warp), "--limit", "300")
    assert report["trigger"] == {"kind": "warp", "grid": 4, "strength": 1.0, "seed": 7, "target": 2}
    # A clean model ignores the warp: it keeps its accuracy and rarely says the target.
    assert report["clean_accuracy"] > 0.85 and report["attack_success_rate"] < 0.05


def test_int4_storage_is_small_and_identical(clean_model: Path, tmp_path: Path) -> None:
    q8, q4 = tmp_path / "int8.onnx", tmp_path / "int4.onnx"
    common = [str(clean_model), "--scheme", "w4a4", "--num-calib", "256"]
    assert main(["quantize", *common, "-o", str(q8)]) == 0
    assert main(["quantize", *common, "--weight-storage", "int4", "-o", str(q4)]) == 0
    assert q4.stat().st_size <= 0.2 * clean_model.stat().st_size
    a = _verify(q8, tmp_path, "--limit", "2000")
    b = _verify(q4, tmp_path, "--limit", "2000")
    assert a["clean_accuracy"] == b["clean_accuracy"]
    sa = make_session(onnx.load(str(q8)), "faithful", "cpu")
    sb = make_session(onnx.load(str(q4)), "faithful", "cpu")
    import numpy as np

    x = np.random.default_rng(0).standard_normal((64, 1, 28, 28)).astype(np.float32)
    assert (sa.run(x) == sb.run(x)).all()


def test_quantize_twice_same_bytes(clean_model: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for out in (a, b):
        assert main(["quantize", str(clean_model), "--scheme", "w4a4", "--num-calib", "256",
                     "--seed", "7", "-o", str(out)]) == 0
    assert a.read_bytes() == b.read_bytes()


def test_gate_fails_with_exit_one(clean_model: Path, tmp_path: Path) -> None:
    assert main(["verify", str(clean_model), "--limit", "500", "--min-accuracy", "0.999"]) == 1
    assert main(["verify", str(clean_model), "--limit", "500", "--min-accuracy", "0.5"]) == 0


def test_defend_writes_metadata_matches_simulation_and_is_deterministic(
        clean_model: Path, tmp_path: Path) -> None:
    outs = [tmp_path / "d1.onnx", tmp_path / "d2.onnx"]
    for out in outs:
        assert main(["defend", str(clean_model), "--preset", "release", "--iters", "60",
                     "--num-calib", "128", "--holdout", "200", "-o", str(out)]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    meta = {p.key: p.value for p in onnx.load(str(outs[0])).metadata_props}
    assert meta["efrap.method"] == "efrap"
    flips = json.loads(meta["efrap.flip_fraction"])
    assert len(flips) == 5 and any(v > 0 for v in flips.values())
    assert json.loads(meta["efrap.rounding"])["iters"] == 60
    # The stored model was exported by efrap: its convs' errors are in pre-BN units.
    units = json.loads(meta["efrap.error_units"])
    assert {k: v for k, v in units.items() if "Conv" in k} == dict.fromkeys(
        json.loads(meta["efrap.bn_fold"]), "pre_bn")
    assert sorted(v for k, v in units.items() if "Gemm" in k) == ["exported", "exported"]
    report = _verify(outs[0], tmp_path, "--reference", "--limit", "2000")
    assert report["parity"]["fraction_differing_predictions"] <= 0.002
    guard = json.loads(meta["efrap.guard"])
    assert guard["images"] == 200 and guard["passed"] and guard["agreement"] > 0.9
    # The default preset measures every layer's errors in grid steps.
    default = tmp_path / "default.onnx"
    assert main(["defend", str(clean_model), "--scheme", "w4a4",
                 "--iters", "20", "--num-calib", "128", "--holdout", "100",
                 "-o", str(default)]) == 0
    meta = {p.key: p.value for p in onnx.load(str(default)).metadata_props}
    assert set(json.loads(meta["efrap.error_units"]).values()) == {"steps"}
    assert json.loads(meta["efrap.rounding"])["flip_weight"] == 0.02


def test_defend_that_breaks_its_budget_exits_one_with_its_report_written(
        clean_model: Path, tmp_path: Path) -> None:
    out, summary = tmp_path / "d.onnx", tmp_path / "d.json"
    # No 20-iteration defense at w4a4 keeps 99.99% of FP's predictions or 99.9% accuracy.
    code = main(["defend", str(clean_model), "--scheme", "w4a4",
                 "--iters", "20", "--num-calib", "128", "--holdout", "300",
                 "--max-agreement-drop", "0.01%", "--min-accuracy", "0.999", "--summary", str(summary),
                 "-o", str(out)])
    assert code == 1
    guard = json.loads(summary.read_text())["guard"]
    assert not guard["passed"] and guard["images"] == 300 and len(guard["why"]) == 2
    assert guard["agreement"] < 0.9999 and guard["accuracy"] < 0.999
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["efrap.guard"]) == guard
    # The same defense within a budget it keeps passes.
    ok = tmp_path / "ok.onnx"
    assert main(["defend", str(clean_model), "--scheme", "w4a4",
                 "--iters", "20", "--num-calib", "128", "--holdout", "300",
                 "--max-agreement-drop", "50%", "--min-accuracy", "0.5", "-o", str(ok)]) == 0
    assert json.loads({p.key: p.value for p in onnx.load(str(ok)).metadata_props}["efrap.guard"])["passed"]
