"""Measure the stored QCB models and regenerate the table in docs/ZOO.md.

Usage: python bench/zoo_table.py [--limit N] [--names NAME ...] [--json bench/results/zoo.json]
           [--doc docs/ZOO.md] [--skip-static] [--no-manifest]

For every zoo entry of kind "qcb", in onnxruntime (optimizations off, the faithful
QDQ semantics) on the test split:

- FP: the released model;
- nearest: `efrap quantize --method nearest` under the targeted scheme;
- cross: nearest under another preset (w8a8 <-> w4a4; w4a8-asym -> w4a4; w4a8 -> w8a8);
- quantize_static: onnxruntime.quantization.quantize_static (bench/ort_baseline.py) after quant_pre_process,
  QDQ, per-channel, MinMax calibration on the same 1,024 training images, the closest
  settings to the targeted scheme (w8a8: uint8 activations, int8 symmetric weights;
  w4a4: uint4 activations, uint4 asymmetric weights, first/last layer and their
  inputs at 8 bits through TensorQuantOverrides; w4a8: int4 symmetric weights, uint8
  activations, quantize_static's own grid).

Figures are clean accuracy (CDA) and attack success over non-target test images
(ASR), in percent. The table between the markers in docs/ZOO.md is replaced, and
each entry's figures are recorded under "metrics" in models/zoo/manifest.json
(fractions; not with --limit or --no-manifest).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx

from bench.ort_baseline import ort_quantize_static
from bench.publish import write_results, write_section
from pipeline.base.deployment import Deployment
from pipeline.base.onnx_io import load_model, save_model
from pipeline.base.progress import log
from pipeline.base.safe_io import write_text
from pipeline.base.scheme import load_scheme
from pipeline.quantize import QuantizeOptions, calibration_images, quantize_file
from validators.verify import VerifyOptions, verify_model

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "models" / "zoo"
OTHER = {"w8a8": "w4a4", "w4a4": "w8a8", "w4a8-asym": "w4a4", "w4a8": "w8a8"}


def _measure(model: str, trigger: str, limit: int | None) -> dict[str, float]:
    report = verify_model(model, VerifyOptions(Deployment(provider="cpu"), trigger=trigger, limit=limit))
    assert report.clean_accuracy is not None and report.attack_success_rate is not None
    return {"cda": 100 * report.clean_accuracy, "asr": 100 * report.attack_success_rate,
            "images": report.images}


def quantize_static_model(fp_path: str, out_path: str, scheme: str, data: str) -> str:
    """onnxruntime's quantize_static (bench/ort_baseline.py) on our 1,024 calibration images; a note."""
    model = load_model(fp_path)
    images, _ = calibration_images(model, data, 1024, 0, fp_path)
    inits = {i.name for i in model.graph.initializer}
    input_name = next(i.name for i in model.graph.input if i.name not in inits)
    note = ort_quantize_static(fp_path, out_path, images, input_name, 64, scheme)
    save_model(onnx.load(out_path), out_path)
    return note


def measure_entry(entry: dict, limit: int | None, skip_static: bool) -> dict:
    """Every configuration of one zoo model."""
    fp = str(ZOO / entry["file"])
    trig = str(ZOO / entry["trigger"])
    scheme = entry["scheme"]
    row: dict = {"name": entry["name"], "attack": entry["attack"], "scheme": scheme,
                 "carrier": entry["carrier"]}
    row["fp"] = _measure(fp, trig, limit)
    with tempfile.TemporaryDirectory() as tmp:
        for key, s in (("nearest", scheme), ("cross", OTHER[scheme])):
            out = str(Path(tmp) / f"{key}.onnx")
            quantize_file(fp, out,
                          QuantizeOptions(Deployment(scheme=load_scheme(s),
                                                     data=entry.get("dataset",
                                                                    "fashion-mnist")), method="nearest"))
            row[key] = {**_measure(out, trig, limit), "scheme": s}
        if not skip_static:
            out = str(Path(tmp) / "static.onnx")
            try:
                note = quantize_static_model(fp, out, scheme, entry.get("dataset", "fashion-mnist"))
                row["quantize_static"] = {**_measure(out, trig, limit), "note": note}
            except Exception as exc:  # report, do not abort the table
                row["quantize_static"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    log(f"{entry['name']}: {json.dumps(row)}")
    return row


def _cell(m: dict | None) -> str:
    if not m or "cda" not in m:
        return "n/a"
    return f"{m['cda']:.2f} / {m['asr']:.2f}"


def render(rows: list[dict], limit: int | None) -> str:
    """The markdown table."""
    lines = [
        f"Measured by `python bench/zoo_table.py` in onnxruntime (optimizations off) on "
        f"{'the first ' + str(limit) if limit else 'all 10,000'} Fashion-MNIST test images. "
        "Cells: clean accuracy / attack success over non-target images, %.",
        "",
        "| model | attack | targeted scheme | carrier | FP | nearest (targeted) | quantize_static "
        "(closest) | nearest, other scheme |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['attack']} | {r['scheme']} | {r['carrier']} | {_cell(r['fp'])} | "
            f"{_cell(r['nearest'])} | {_cell(r.get('quantize_static'))} | "
            f"{_cell(r['cross'])} ({r['cross']['scheme']}) |")
    return "\n".join(lines)


def record_in_manifest(manifest: dict, rows: list[dict]) -> None:
    """Store each row's figures as the entry's "metrics" (fractions), atomically."""
    entries = manifest["models"]
    by_name = {r["name"]: r for r in rows}
    for entry in entries:
        row = by_name.get(entry["name"])
        if row is None:
            continue
        metrics = {}
        for key in ("fp", "nearest", "quantize_static", "cross"):
            m = row.get(key) or {}
            if "cda" in m:
                metrics[key] = {"clean_accuracy": round(m["cda"] / 100, 4),
                                "attack_success_rate": round(m["asr"] / 100, 4),
                                **({"scheme": m["scheme"]} if "scheme" in m else {})}
        entry["metrics"] = {**metrics, "opt_level": "faithful", "provider": "CPUExecutionProvider",
                            "images": row["fp"]["images"]}
    # Not write_json: it sorts keys, and the manifest keeps its hand-chosen field order.
    text = json.dumps(manifest, indent=2) + "\n"
    write_text(ZOO / "manifest.json", text)


def main() -> None:
    """Measure and rewrite the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, help="first N test images only")
    parser.add_argument("--names", nargs="*",
                        help="measure only these zoo entries (the others' rows are kept from --json)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "zoo.json"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "ZOO.md"))
    parser.add_argument("--skip-static", action="store_true")
    parser.add_argument("--no-manifest", action="store_true",
                        help="do not record the figures in the manifest (never done with --limit)")
    args = parser.parse_args()
    manifest = json.loads((ZOO / "manifest.json").read_text())
    entries = [e for e in manifest["models"] if e.get("kind") == "qcb"
               and (not args.names or e["name"] in args.names)]
    rows = [measure_entry(e, args.limit, args.skip_static) for e in entries]
    if args.names and Path(args.json).exists() and args.limit is None:
        # Keep the other entries' rows of the last full run, in manifest order.
        fresh = {r["name"]: r for r in rows}
        old = {r["name"]: r for r in json.loads(Path(args.json).read_text())}
        rows = [fresh.get(e["name"]) or old[e["name"]] for e in manifest["models"]
                if e.get("kind") == "qcb" and (e["name"] in fresh or e["name"] in old)]
    if not args.no_manifest and args.limit is None:
        record_in_manifest(manifest, rows)
    write_results(rows, args.json)
    write_section(Path(args.doc), "zoo-table", render(rows, args.limit))
    print(render(rows, args.limit))


if __name__ == "__main__":
    main()
