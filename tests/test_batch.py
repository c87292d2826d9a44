"""`efrap batch`: manifest checks, a local batch with a broken model, resume, --jobs 2, the tables."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.base.deployment import Deployment
from pipeline.base.runtime import make_session
from pipeline.base.trigger import paper_trigger, save_trigger
from pipeline.batch import load_manifest
from pipeline.batch.job import limit_threads
from pipeline.batch.local import cores
from pipeline.batch.ray_runner import task_resources
from pipeline.batch.store import open_store
from pipeline.cli.main import main
from tests.conftest import export_tiny
from validators.verify import VerifyOptions, verify_model

GOOD = """
[defaults]
data = "npz:data.npz"
num_calib = 64
holdout = 64
scan = false
method = "nearest"
scheme = "w8a8"

[[model]]
name = "good"
path = "good.onnx"
trigger = "trigger.json"

[[model]]
path = "broken.onnx"

[[model]]
name = "learned"
path = "learned.onnx"
trigger = "trigger.json"
method = "efrap"
scheme = "w4a4"
scan = true
scan_budget = 3
[model.rounding]
iters = 5
batch_size = 8
"""


def _inputs(folder: Path) -> None:
    """Two tiny models, a broken one, a small labelled npz and a trigger."""
    export_tiny(folder / "good.onnx", seed=0)
    export_tiny(folder / "learned.onnx", seed=1)
    (folder / "broken.onnx").write_bytes(b"\x00\xffnot a protobuf" * 16)
    rng = np.random.default_rng(0)
    np.savez(folder / "data.npz",
             x_train=rng.integers(0, 256, (160, 1, 28, 28), dtype=np.uint8), y_train=rng.integers(0, 10, 160),
             x_test=rng.integers(0, 256, (96, 1, 28, 28), dtype=np.uint8), y_test=rng.integers(0, 10, 96))
    save_trigger(paper_trigger(28, target=0), folder / "trigger.json")


def _manifest(folder: Path, text: str, name: str = "batch.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "expect"), [
    ("[defualts]\n[[model]]\npath = 'a.onnx'\n", "unknown key 'defualts' (did you mean 'defaults'?)"),
    ("[[model]]\npath = 'a.onnx'\niter = 5\n", "model[0]: unknown key 'iter'"),
    ("[[model]]\npath = 'a.onnx'\nnum_calib = 8.0\n", "model[0].num_calib must be an integer"),
    ("[[model]]\npath = 'a.onnx'\nverify_fp = 'false'\n", "model[0].verify_fp must be true or false"),
    ("[defaults.rounding]\niterz = 3\n[[model]]\npath = 'a.onnx'\n",
     "defaults.rounding: unknown key 'iterz' (did you mean 'iters'?)"),
    ("[defaults.rounding]\niters = '200'\n[[model]]\npath = 'a.onnx'\n",
     "defaults.rounding.iters must be an integer"),
    ("[[model]]\npath = 'a.onnx'\nmethod = 'efrapp'\n", "model[0].method must be one of"),
    ("[[model]]\npath = 'a.onnx'\nmethod = 'adaround'\n[model.rounding]\nflip_weight = 1.0\n",
     "model[0]: method 'adaround' has no setting 'flip_weight'"),
    ("[[model]]\npath = 'a.onnx'\n[[model]]\npath = 'b/a.onnx'\n",
     "model[1].name 'a' is already the name of model[0]"),
    ("[[model]]\npath = 'a.onnx'\nname = '../up'\n", "model[0].name '../up' must be"),
    ("[[model]]\nname = 'x'\n", "model[0]: needs a 'path'"),
    ("[defaults]\nseed = 1\n", "lists no models"),
    ("[[model]]\npath = 'a.onnx'\n[model.gate]\nmax_asr = '100%'\n", "lets every model pass"),
    ("[[model]]\npath = 'a.onnx'\n[model.preprocess]\nstd = 'x'\n", "preprocess std"),
    ("[[model]]\npath = 'a.onnx'\nscheme = 'w3a3'\n", "model[0].scheme"),
    ("[[model]]\npath = 'a.onnx'\nseed = -1\n", "model[0].seed must be at least 0"),
    ("[[model]\npath = 'a.onnx'\n", "cannot parse"),
])
def test_bad_manifest_is_one_line_exit_2_nothing_written(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         text: str, expect: str) -> None:
    manifest = _manifest(tmp_path, text)
    out = tmp_path / "out"
    assert main(["batch", str(manifest), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("efrap batch: error: "), err
    assert str(manifest) in err[0] and expect in err[0], err[0]
    assert not out.exists()


def test_manifest_defaults_and_overrides(tmp_path: Path) -> None:
    manifest = load_manifest(_manifest(tmp_path, GOOD))
    good, broken, learned = manifest.jobs
    assert (good.name, broken.name, learned.name) == ("good", "broken", "learned")
    assert good.options.method == "nearest" and good.options.scheme.name == "w8a8" and good.step == "quantize"
    assert learned.step == "defend" and learned.options.config.iters == 5 and learned.learned
    assert learned.options.config.lr == 1e-3  # the method's own default where the manifest is silent
    assert good.options.calib == good.data == f"npz:{tmp_path / 'data.npz'}"
    assert good.trigger == str(tmp_path / "trigger.json") and broken.trigger is None
    assert not good.scan and learned.scan and learned.scan_budget == 3.0
    # A job travels to its Ray worker by pickle, and arrives with the same settings.
    assert pickle.loads(pickle.dumps(learned)) == learned
    # 1 and 1.0 are one setting, so they give one key.
    text = "[[model]]\npath = 'a.onnx'\n[model.rounding]\nlr = {}\n"
    one = load_manifest(_manifest(tmp_path, text.format("1"), "one.toml"))
    other = load_manifest(_manifest(tmp_path, text.format("1.0"), "other.toml"))
    assert one.jobs[0].settings() == other.jobs[0].settings()


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="") as fh:
        return {r["name"]: r for r in csv.DictReader(fh)}


def test_local_batch_broken_model_resume_and_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _inputs(tmp_path)
    manifest = _manifest(tmp_path, GOOD)
    out = tmp_path / "out"
    # --jobs 2: two job processes side by side, cores // 2 threads each; the broken model fails alone.
    assert main(["batch", str(manifest), "--out", str(out), "--jobs", "2"]) == 1
    first = capsys.readouterr()
    rows = _rows(out)
    assert [r["status"] for r in rows.values()] == ["done", "error", "done"]
    broken = rows["broken"]["error"]
    assert broken.startswith("read: ") and "not a readable ONNX model" in broken
    assert all(r["this_run"] == "computed" for r in rows.values())
    assert "broken" in first.out and "not a readable ONNX model" in first.out
    results = {name: json.loads((out / name / "result.json").read_text()) for name in rows}
    for name in ("good", "learned"):
        record = results[name]
        assert record["threads"] == max(1, cores() // 2)
        assert {"model.qdq.onnx", "summary.json", "verify.json", "verify_fp.json", "log.txt"} <= \
            {p.name for p in (out / name).iterdir()}
        # The table's figures are the output's as `efrap verify` measures it.
        options = VerifyOptions(Deployment(data=f"npz:{tmp_path / 'data.npz'}"),
                                trigger=str(tmp_path / "trigger.json"))
        report = verify_model(str(out / name / "model.qdq.onnx"), options)
        assert record["output"]["clean_accuracy"] == report.clean_accuracy
        assert float(rows[name]["cda"]) == report.clean_accuracy
        assert float(rows[name]["asr"]) == report.attack_success_rate
        assert 0.0 <= float(rows[name]["agreement"]) <= 1.0 and int(rows[name]["out_bytes"]) > 0
    assert results["good"]["scan"]["skipped"] == "scan = false in the manifest"
    scan = results["learned"]["scan"]
    assert "verdict" in scan and "skipped" not in scan
    table = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in table["rows"]] == ["good", "broken", "learned"]
    html = (out / "index.html").read_text()
    assert "<table>" in html and 'href="good/result.json"' in html and "not a readable ONNX model" in html

    # A second run skips all three (the failed one too) and changes no result.
    stored = {name: (out / name / "result.json").read_bytes() for name in rows}
    assert main(["batch", str(manifest), "--out", str(out)]) == 1
    # The log (stderr when not quiet, and batch.log) says which were skipped.
    second = (out / "batch.log").read_text().split("batch.toml: 3 models")[-1]
    for name in rows:
        assert f"skip {name}: a result exists for this model" in second
        assert (out / name / "result.json").read_bytes() == stored[name]
    assert all(r["this_run"] == "skipped" for r in _rows(out).values())
    log = (out / "batch.log").read_text()
    assert log.count("start good ") == 1 and log.count("skip good:") == 1

    # A changed setting runs that model again, and only it.
    manifest.write_text(GOOD.replace('name = "good"', 'name = "good"\nseed = 1'))
    assert main(["batch", str(manifest), "--out", str(out)]) == 1
    third = (out / "batch.log").read_text().split("batch.toml: 3 models")[-1]
    assert "rerun good: the stored result is for another model file or other settings" in third
    assert "skip learned:" in third and "skip broken:" in third
    assert [r["this_run"] for r in _rows(out).values()] == ["computed", "skipped", "skipped"]


def test_out_must_be_a_folder_and_is_locked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = _manifest(tmp_path, "[[model]]\npath = 'a.onnx'\n")
    (tmp_path / "file").write_text("x")
    assert main(["batch", str(manifest), "--out", str(tmp_path / "file")]) == 2
    assert "--out must be a folder" in capsys.readouterr().err
    with open_store(tmp_path / "busy"):
        assert main(["batch", str(manifest), "--out", str(tmp_path / "busy")]) == 2
    assert "another efrap batch is running on this folder" in capsys.readouterr().err
    assert main(["batch", str(manifest), "--jobs", "2", "--ray", "auto"]) == 2
    assert "--jobs runs models side by side" in capsys.readouterr().err


def test_limit_threads_sets_torch_and_onnxruntime() -> None:
    before_torch, before_defaults = torch.get_num_threads(), make_session.__defaults__
    try:
        limit_threads(1)
        model = (Path(__file__).parent.parent / "models" / "zoo" / "fmnist_small_cnn_clean.onnx").read_bytes()
        session = make_session(model)
        assert torch.get_num_threads() == 1
        assert session.session.get_session_options().intra_op_num_threads == 1
    finally:
        torch.set_num_threads(before_torch)
        make_session.__defaults__ = before_defaults


def test_ray_asks_for_a_gpu_only_for_learned_rounding_on_a_gpu_cluster(tmp_path: Path) -> None:
    manifest = load_manifest(_manifest(tmp_path, GOOD))
    good, _, learned = manifest.jobs
    assert task_resources(learned, 2, cluster_gpus=4) == {"num_cpus": 2, "num_gpus": 1.0}
    assert task_resources(learned, 2, cluster_gpus=0) == {"num_cpus": 2, "num_gpus": 0}
    assert task_resources(good, 1, cluster_gpus=4) == {"num_cpus": 1, "num_gpus": 0}
    text = GOOD.replace('scheme = "w4a4"', 'scheme = "w4a4"\ndevice = "cpu"')
    on_cpu = load_manifest(_manifest(tmp_path, text, "cpu.toml"))
    assert task_resources(on_cpu.jobs[2], 1, cluster_gpus=4)["num_gpus"] == 0
