"""Coverage: every corpus model through every method, against onnxruntime's quantize_static.

The corpus (bench/corpus_models.py, in a cache folder, never in git): nine
architectures trained briefly on 3-channel 32x32 Fashion-MNIST and exported by both
torch exporters (the TorchScript files carry `efrap.normalization`, the dynamo files
carry nothing and get their preprocessing from options), and the rapidocr models that
nobody here wrote, with rendered text as data.

For each model, each step runs as its own `efrap quantize` child process (wall time
and peak resident memory from the child's rusage, the one-line error of a failure):
nearest W8A8 and w4a8, AdaRound and EFRAP (w4a8, short iterations), and onnxruntime's
quantize_static (QDQ, per-channel, MinMax, uint8 activations, int8 weights) on the same
model-ready calibration inputs. Every output is then loaded at optimization level
`all` and compared with the FP model on held-out inputs: top-1 agreement (classifiers)
and relative output error. Latency: FP32, our W8A8 and quantize_static's W8A8 at level
`all`, interleaved in one run.

Usage:
    python bench/corpus_models.py          # build the corpus first
    python bench/coverage.py [--only NAME ...] [--iters N] [--num-calib N] [--skip-latency]
Writes docs/COVERAGE.md and bench/results/coverage.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.child import ChildRun, run_child
from bench.corpus_models import default_cache, load_manifest, rapidocr_models
from bench.ort_baseline import ort_quantize_static
from bench.publish import write_results
from models.corpus_data import FMNIST32_MEAN, FMNIST32_STD, fmnist32, text_lines, text_pages
from pipeline.base.onnx_io import fixed_batch, image_input, load_model
from pipeline.base.provenance import versions
from pipeline.base.runtime import make_session
from pipeline.cli.args import preprocess_options
from pipeline.cli.main import build_parser
from pipeline.quantize import calibration_images
from validators.report import pct, table

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs/COVERAGE.md"
#: The line `efrap quantize` prints when a layer's learned rounding ends (pipeline.quantize).
LAYER_LINE = re.compile(r"flipped [0-9.]+%, rec ([0-9.eE+-]+) \(nearest\) -> ([0-9.eE+-]+)")
#: Options that give the rapidocr models their preprocessing (bench/corpus_models.py
#: RAPIDOCR_PREPROCESS: BGR, x / 255, (x - 0.5) / 0.5).
PADDLE = ["--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--channel-order", "bgr"]
FMNIST = ["--mean", ",".join(str(v) for v in FMNIST32_MEAN), "--std", ",".join(str(v) for v in FMNIST32_STD)]


@dataclass
class Subject:
    """One corpus model with its data and options."""

    name: str
    path: Path
    calib: str
    test: Path
    options: list[str]
    classifier: bool = True
    notes: dict = field(default_factory=dict)


def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    if not path.exists():
        np.savez(path, x=x, y=y)
    return path


def subjects(cache: Path, num_test: int) -> list[Subject]:
    """The corpus entries of the cache's manifest, then the rapidocr models."""
    data = cache / "data"
    data.mkdir(exist_ok=True)
    xtr, ytr = fmnist32("train", 4096, seed=11)
    xte, yte = fmnist32("test", num_test, seed=12)
    to_u8 = lambda x: np.rint(x * 255).astype(np.uint8)  # noqa: E731  (exact: pixels were k/255)
    train = _npz(data / "fmnist32_train.npz", to_u8(xtr), ytr)
    test = _npz(data / "fmnist32_test.npz", to_u8(xte), yte)
    out = []
    for entry in load_manifest(cache).get("models", []):
        options = [] if entry["exporter"] == "torchscript" else FMNIST
        out.append(Subject(f"{entry['name']}.{entry['exporter']}", cache / entry["file"], f"npz:{train}",
                           test, options, notes={"torch_accuracy": entry.get("test_accuracy")}))
    ocr = rapidocr_models(cache)
    lines_x, lines_y = text_lines(1024 + num_test, seed=21)
    lines_train = _npz(data / "lines_train.npz", lines_x[:1024], lines_y[:1024])
    lines_test = _npz(data / "lines_test.npz", lines_x[1024:], lines_y[1024:])
    out.append(Subject("rapidocr_cls", ocr["rapidocr_cls"], f"npz:{lines_train}", lines_test, PADDLE))
    pages = text_pages(160, seed=22)
    pages_train = _npz(data / "pages_train.npz", pages[:128], np.zeros(128, np.int64))
    pages_test = _npz(data / "pages_test.npz", pages[128:], np.zeros(32, np.int64))
    out.append(Subject("rapidocr_det", ocr["rapidocr_det"], f"npz:{pages_train}", pages_test, PADDLE,
                       classifier=False))
    return out


STEPS = {
    "nearest w8a8": ["--scheme", "w8a8"],
    "nearest w4a8": ["--scheme", "w4a8"],
    "adaround w4a8": ["--scheme", "w4a8", "--method", "adaround"],
    "efrap w4a8": ["--scheme", "w4a8", "--method", "efrap"],
}


def qs_worker(model: str, out: str, calib: str, num: int, options: str) -> None:
    """Child entry point: onnxruntime quantize_static on the pipeline's calibration inputs."""
    args = build_parser().parse_args(["quantize", model, "-o", out, *json.loads(options)])
    fp = load_model(model)
    images, _ = calibration_images(fp, calib, num, 0, model, preprocess_options(args))
    ort_quantize_static(model, out, images, image_input(fp).name, fixed_batch(fp) or 32)


def _inputs(subject: Subject, model: onnx.ModelProto) -> np.ndarray:
    """Model-ready held-out inputs, preprocessed as the pipeline preprocesses them."""
    args = build_parser().parse_args(["quantize", str(subject.path), "-o", "x", *subject.options])
    n = len(np.load(subject.test)["y"])
    images, _ = calibration_images(model, f"npz:{subject.test}", n, 0, str(subject.path),
                                   preprocess_options(args))
    return np.asarray(images[:])


def _run(path: Path, x: np.ndarray, batch: int | None) -> np.ndarray:
    session = make_session(onnx.load(str(path)), "all", "cpu")
    step = batch or 64
    parts = []
    for i in range(0, len(x), step):
        feed = x[i : i + step]
        if batch is not None and len(feed) < batch:  # a fixed batch: pad the last one
            feed = np.concatenate([feed, np.repeat(feed[:1], batch - len(feed), axis=0)])
        parts.append(session.session.run(None, {session.input_name: feed})[0][: len(x[i : i + step])])
    return np.concatenate(parts)


def compare(fp: np.ndarray, q: np.ndarray, classifier: bool) -> dict:
    """Top-1 agreement (classifiers) and relative mean absolute output error."""
    out = {"rel_error": float(np.abs(q - fp).mean() / max(np.abs(fp).mean(), 1e-12))}
    if classifier:
        top = q.reshape(len(q), -1).argmax(1) == fp.reshape(len(fp), -1).argmax(1)
        out["agreement"] = float(top.mean())
    return out


def measure(subject: Subject, work: Path, iters: int, num_calib: int, steps: list[str]) -> dict:
    """The chosen steps of one subject (and quantize_static), each output compared with FP."""
    model = load_model(subject.path)
    batch = fixed_batch(model)  # None: dynamic (paddle writes -1)
    row: dict = {"name": subject.name, "file": subject.path.name,
                 "size_mib": round(subject.path.stat().st_size / 2**20, 2),
                 "ops": dict(collections.Counter(n.op_type for n in model.graph.node)),
                 "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                 "batch": batch or "dynamic", "steps": {}, **subject.notes}
    x = _inputs(subject, model)
    fp = _run(subject.path, x, batch)
    calib = ["--calib", subject.calib, "--num-calib", str(num_calib)]
    for label in steps:
        extra = STEPS[label]
        out = work / f"{subject.name}.{label.replace(' ', '_')}.onnx"
        more = ["--iters", str(iters)] if "--method" in extra else []
        child = run_child(["-m", "pipeline.cli.main", "quantize", str(subject.path), "-o", str(out),
                           *calib, *extra, *more, *subject.options], work / f"{out.stem}.log", timeout=7200)
        row["steps"][label] = _outcome(child, out, fp, x, batch, subject.classifier)
    out = work / f"{subject.name}.quantize_static.onnx"
    child = run_child([str(Path(__file__)), "--qs-worker", str(subject.path), str(out), subject.calib,
                       str(num_calib), json.dumps(subject.options)], work / f"{out.stem}.log", timeout=7200)
    row["steps"]["quantize_static w8a8"] = _outcome(child, out, fp, x, batch, subject.classifier)
    return row


def layer_errors(log: Path) -> dict[str, int]:
    """How many layers a learned rounding left with a larger activation loss than nearest.

    Read from the step's log (each layer's `rec <nearest> -> <final>` line); empty for a
    step that learns nothing.
    """
    text = log.read_text(errors="replace").replace("\r", "\n") if log.exists() else ""
    pairs = [(float(a), float(b)) for a, b in LAYER_LINE.findall(text)]
    return {"layers": len(pairs), "layers_worse": sum(b > a for a, b in pairs)} if pairs else {}


def _outcome(child: ChildRun, out: Path, fp: np.ndarray, x: np.ndarray, batch: int | None,
             classifier: bool) -> dict:
    result = {**child.to_json(), "file": out.name, **layer_errors(out.with_suffix(".log"))}
    if child.exit != 0 or not out.exists():
        return {**result, "error": child.last_line}
    try:
        result.update(compare(fp, _run(out, x, batch), classifier),
                      size_mib=round(out.stat().st_size / 2**20, 2))
    except Exception as exc:  # a model that onnxruntime refuses at level `all` is a finding
        result["error"] = f"does not run at opt level all: {str(exc).splitlines()[0]}"
    return result


def latency(row: dict, work: Path, x: np.ndarray, batch: int, rounds: int = 20) -> dict:
    """Median ms of FP32, our W8A8 and quantize_static's W8A8 at level `all`, interleaved."""
    files = {"fp32": Path(row["path"]).expanduser()}
    for key, step in (("ours", "nearest w8a8"), ("quantize_static", "quantize_static w8a8")):
        outcome = row["steps"].get(step, {})
        if "error" not in outcome and "file" in outcome:  # a failed step has nothing to time
            files[key] = work / outcome["file"]
    sessions, kernels = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, p in files.items():
            if not p.exists():
                continue
            optimized = Path(tmp) / f"{k}.onnx"
            sessions[k] = make_session(onnx.load(str(p)), "all", "cpu", threads=2,
                                       optimized_path=str(optimized))
            kernels[k] = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    feed = x[:batch]
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(3):
        for s in sessions.values():
            s.session.run(None, {s.input_name: feed})
    for _ in range(rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.session.run(None, {s.input_name: feed})
            times[k].append(time.perf_counter() - t)
    out: dict = {k: round(1000 * statistics.median(v), 3) for k, v in times.items()}
    if {"ours", "quantize_static"} <= set(kernels):
        out["kernel_difference"] = kernel_difference(kernels["ours"], kernels["quantize_static"])
    return out


def kernel_difference(ours: collections.Counter, qs: collections.Counter) -> dict[str, int]:
    """Op types onnxruntime runs more (+) or fewer (-) times in our optimized graph than in quantize_static's.

    A QuantizeLinear or DequantizeLinear more or less (the graph's input and output) is
    left out. Two graphs with the same kernels differ in timing only by the machine's noise.
    """
    edge = ("QuantizeLinear", "DequantizeLinear")
    return {op: ours[op] - qs[op] for op in sorted(set(ours) | set(qs))
            if ours[op] != qs[op] and not (op in edge and abs(ours[op] - qs[op]) <= 1)}


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, met or missed per model, computed from the rows."""
    def ok(step: dict | None) -> bool:
        return step is not None and "error" not in step

    def score(step: dict, classifier: bool) -> float:
        # Higher is better: agreement for classifiers, minus the relative error for the detector.
        return step["agreement"] if classifier else -step["rel_error"]

    def shown(step: dict, classifier: bool) -> str:
        return f"{100 * step['agreement']:.1f}" if classifier else f"err {step['rel_error']:.3f}"

    out: list[str] = []
    near = [(r["name"], r["steps"]["nearest w8a8"]["agreement"],
             r["steps"]["quantize_static w8a8"]["agreement"])
            for r in rows if r.get("classifier", True) and ok(r["steps"].get("nearest w8a8"))
            and ok(r["steps"].get("quantize_static w8a8"))]
    miss = [f"{n} ({100 * a:.1f} vs {100 * q:.1f})" for n, a, q in near if a < q - 0.005]
    out.append(f"- Nearest W8A8 agreement at least quantize_static's minus 0.5 points: met on "
               f"{len(near) - len(miss)} of {len(near)} classifiers where quantize_static's output runs"
               + (f"; missed: {', '.join(miss)}." if miss else "."))
    for label in ("adaround w4a8", "efrap w4a8"):
        pairs = [(r, r["steps"][label], r["steps"]["nearest w4a8"]) for r in rows
                 if ok(r["steps"].get(label)) and ok(r["steps"].get("nearest w4a8"))]
        worse = [(r, lr, nr) for r, lr, nr in pairs
                 if score(lr, r.get("classifier", True)) < score(nr, r.get("classifier", True))]
        text = ", ".join(
            f"{r['name']} ({shown(lr, r.get('classifier', True))} vs {shown(nr, r.get('classifier', True))}; "
            f"{lr.get('layers_worse', '?')} of {lr.get('layers', '?')} layers above nearest's loss)"
            for r, lr, nr in worse)
        out.append(f"- {label} at least nearest w4a8: met on {len(pairs) - len(worse)} of {len(pairs)} "
                   "models" + (f"; below on {text}." if worse else "."))
    timed = [r for r in rows if {"ours", "quantize_static", "fp32"} <= set(r.get("latency", {}))]
    slow = [r for r in timed if r["latency"]["ours"] > r["latency"]["quantize_static"]]

    def slower(r: dict) -> str:
        lat = r["latency"]
        diff = lat.get("kernel_difference")
        kernels = "kernels not compared" if diff is None else "other kernels" if diff else "same kernels"
        return (f"{r['name']} ({lat['ours'] / lat['fp32']:.2f} vs "
                f"{lat['quantize_static'] / lat['fp32']:.2f}, {kernels})")

    above = f"; above on {', '.join(slower(r) for r in slow)}." if slow else "."
    out.append(f"- W8A8 latency at most quantize_static's: met on {len(timed) - len(slow)} of {len(timed)} "
               f"timed models{above}")
    out += ["", "Where the two graphs run the same kernels, a latency difference is the machine's noise. "
            "Where they differ, the kernels column names the ops: ours keeps LayerNorm's affine, GELU's "
            "erf-plus-one and Softmax in float where quantize_static quantizes them, for agreement (the "
            "table's agreement columns). EFRAP's flip term moves weights off nearest rounding by design "
            "(it is the defense: docs/DEFENSE.md); at 100 iterations per layer the reconstruction has "
            "little time to pay for the flips, so on clean models its agreement can fall below nearest's, "
            "and the layers-worse count shows where the layer losses stayed above nearest's."]
    return out


def render(rows: list[dict], settings: dict) -> str:
    """docs/COVERAGE.md."""
    head = ["model", "batch", "MiB", "nearest w8a8", "quantize_static", "nearest w4a8", "adaround w4a8",
            "efrap w4a8", "latency ours/qs (x FP32)", "kernels ours - qs"]
    lines = ["# Coverage: the corpus through every method", "",
             "Generated by `python bench/coverage.py` (after `python bench/corpus_models.py`). Every figure "
             "comes from onnxruntime at optimization level `all`, CPU provider. Agreement: top-1 agreement "
             "with the FP model on held-out inputs (percent); the detector, whose output is a probability "
             "map, is judged by relative output error. quantize_static: onnxruntime's own QDQ, per-channel, "
             "MinMax, u8/s8, on the same calibration inputs. `not run`: the step has not been run for "
             "that model yet (learned rounding takes minutes per model; `--steps` and `--only` add "
             "steps to the JSON without losing the others). Latency: median ms of batch 16 at level "
             "`all`, the three models timed in interleaved rounds, as a ratio to FP32; it is only as "
             "steady as the machine was quiet. Kernels ours - qs: the op types onnxruntime runs more (+) "
             "or fewer (-) times in our optimized graph than in quantize_static's (`same`: the two run "
             "the same kernels, so a latency difference between them is the machine's noise).", "",
             f"Settings: {json.dumps(settings, sort_keys=True)}", "",
             "## Agreement with FP (percent) and latency", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["steps"]
        lat = r.get("latency", {})
        ratio = (f"{lat['ours'] / lat['fp32']:.2f} / {lat['quantize_static'] / lat['fp32']:.2f}"
                 if {"ours", "quantize_static", "fp32"} <= set(lat) else "n/a")
        cells = [r["name"], str(r["batch"]), f"{r['size_mib']:.2f}"]
        for label in ("nearest w8a8", "quantize_static w8a8", "nearest w4a8", "adaround w4a8", "efrap w4a8"):
            step = s.get(label)
            if step is None:
                cells.append("not run")
                continue
            if "error" in step:
                cells.append("FAILED")
            elif r.get("classifier", True):
                cells.append(pct(step.get("agreement"), "n/a", digits=1, unit=""))
            else:
                cells.append(f"err {step['rel_error']:.3f}")
        cells.append(ratio)
        diff = lat.get("kernel_difference")
        cells.append("n/a" if diff is None else (", ".join(f"{k} {v:+d}" for k, v in diff.items()) or "same"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Goals", "", *goals(rows)]
    lines += ["", "## Time and peak memory of each step (child process)", "",
              "Layers worse than nearest: for learned rounding, the layers whose activation loss on "
              "the calibration data ended above nearest rounding's (EFRAP's flip term pays "
              "reconstruction for flips by design).", "",
              "| model | step | seconds | peak MiB | output MiB | relative output error | "
              "layers worse than nearest |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        for label, step in r["steps"].items():
            err = f"{step['rel_error']:.4f}" if "rel_error" in step else "-"
            size = f"{step['size_mib']:.2f}" if "size_mib" in step else "-"
            worse = f"{step['layers_worse']} of {step['layers']}" if "layers" in step else "-"
            lines.append(f"| {r['name']} | {label} | {step['seconds']:.1f} | {step['peak_mib']:,} | "
                         f"{size} | {err} | {worse} |")
    failures = [(r["name"], label, step["error"]) for r in rows for label, step in r["steps"].items()
                if "error" in step]
    lines += ["", "## Failures", ""]
    lines += [f"- {name}, {label}: `{err}`" for name, label, err in failures] or ["None."]
    lines += ["", "## Op types of each model", ""]
    lines += [f"- {r['name']} (opset {r['opset']}): " + ", ".join(f"{k} {v}" for k, v in
                                                                 sorted(r["ops"].items())) for r in rows]
    lines += ["", f"Versions: {json.dumps(versions(), sort_keys=True)}", ""]
    return "\n".join(lines)


def save(rows: list[dict], settings: dict, path: Path) -> None:
    """Write the JSON and regenerate docs/COVERAGE.md from the same rows."""
    write_results({"settings": settings, "rows": rows, "versions": versions()}, path)
    DOC.write_text(render(rows, settings))


def main() -> None:
    """Measure the corpus, write the JSON and docs/COVERAGE.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--only", nargs="*", help="only these subjects (e.g. resnet18.dynamo rapidocr_cls)")
    parser.add_argument("--iters", type=int, default=100, help="learned rounding's iterations per layer")
    parser.add_argument("--num-calib", type=int, default=512)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--steps", nargs="*", choices=tuple(STEPS), default=list(STEPS),
                        help="our steps to run (default all; quantize_static always runs)")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--latency-only", action="store_true",
                        help="re-measure only the latencies of the models in the JSON (on a quiet machine)")
    parser.add_argument("--refresh-logs", action="store_true",
                        help="re-read the per-layer figures of the JSON's steps from their logs")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/coverage.json")
    parser.add_argument("--qs-worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.qs_worker:
        model, out, calib, num, options = args.qs_worker
        qs_worker(model, out, calib, int(num), options)
        return
    cache = args.cache or default_cache()
    work = cache / "coverage"
    work.mkdir(parents=True, exist_ok=True)
    previous = {r["name"]: r for r in json.loads(args.json.read_text())["rows"]} if args.json.exists() else {}
    settings = {"iters": args.iters, "num_calib": args.num_calib, "num_test": args.num_test,
                "latency": "batch 16 (detector 1), 2 threads, median of 20 interleaved runs"}
    if args.refresh_logs:
        for row in previous.values():
            for step in row["steps"].values():
                if "file" in step:
                    step.update(layer_errors((work / step["file"]).with_suffix(".log")))
        rows = list(previous.values())
        save(rows, settings, args.json)
        return
    if args.latency_only:
        for subject in subjects(cache, args.num_test):
            row = previous.get(subject.name)
            if row is None or (args.only and subject.name not in args.only):
                continue
            x = _inputs(subject, load_model(subject.path))
            row["latency"] = latency(row, work, x, 16 if subject.classifier else 1)
            print(f"coverage: {subject.name} latency {row['latency']}", flush=True)
        rows = list(previous.values())
        save(rows, settings, args.json)
        return
    # Every write keeps the rows of subjects not (yet) measured in this run, so a run that
    # stops halfway loses nothing.
    known = dict(previous)
    order = subjects(cache, args.num_test)
    rows: list[dict] = []
    for subject in order:
        if args.only and subject.name not in args.only:
            continue
        print(f"coverage: {subject.name}", flush=True)
        row = measure(subject, work, args.iters, args.num_calib, args.steps)
        # Steps not run this time keep their earlier outcome (e.g. learned rounding added later).
        earlier = known.get(subject.name, {})
        row["steps"] = {**earlier.get("steps", {}), **row["steps"]}
        if "latency" in earlier and args.skip_latency:
            row["latency"] = earlier["latency"]
        row.update(path=str(subject.path), classifier=subject.classifier)
        if not args.skip_latency:
            x = _inputs(subject, load_model(subject.path))
            row["latency"] = latency(row, work, x, 16 if subject.classifier else 1)
        known[subject.name] = row
        rows = [known[s.name] for s in order if s.name in known]
        save(rows, settings, args.json)
    print(table(["model", "steps failed"], [[r["name"], sum("error" in s for s in r["steps"].values())]
                                            for r in rows]))


if __name__ == "__main__":
    main()
