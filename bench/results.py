"""Defense results on QCB models, measured in onnxruntime; writes a table into docs/RESULTS.md.

Usage:
    python bench/results.py [--iters N] [--names NAME ...] [--limit N]
    python bench/results.py --models A.onnx B.onnx ... [--iters N]     # held-out models
    python bench/results.py --merge A.json B.json    # combine partial runs (e.g. --names halves)

For each model, under the scheme its attack targets: the FP model, and the model
quantized with `nearest`, `adaround` and `efrap` (each with its own defaults, the
release's 10,000 iterations per layer unless --iters), all verified with the model's
trigger at optimization level `faithful` on the CPU provider. CDA is clean accuracy,
ASR attack success over test images whose label is not the target, both in percent.
Floors checked: EFRAP ASR at most 5% and CDA within 2 points of FP.

Zoo entries (the default) fill the table between the `results:zoo` markers of
docs/RESULTS.md and bench/results/results.json; models given with --models (built by
`efrap attack`, trigger beside them as NAME.trigger.json, scheme from their metadata)
fill the `results:heldout` table and bench/results/heldout.json. Text outside the
markers is kept.

Carrier check (4-bit schemes): nearest rounding with only the weights at the scheme's
bit-width (activations at 8 bits) and with only the activations at it (weights at 8
bits) shows whether a backdoor rides on weight rounding, which weight-rounding
defenses (AdaRound, EFRAP) can change, or on activation rounding, which they cannot.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.attacks.build import output_paths
from models.zoo import load_manifest, trigger_path, zoo_path
from pipeline.base.onnx_io import get_metadata, load_model
from pipeline.base.progress import log
from pipeline.base.provenance import versions
from pipeline.quantize import QuantizeOptions, quantize_file
from pipeline.rounding import get_method
from pipeline.scheme import Scheme, load_scheme
from validators.verify import VerifyOptions, verify_model

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("nearest", "adaround", "efrap")
HEADERS = ["model", "scheme", "carrier", "FP CDA/ASR", "nearest CDA/ASR", "adaround CDA/ASR",
           "efrap CDA/ASR", "floors", "nearest, low-bit weights only",
           "nearest, low-bit activations only"]


@dataclass(frozen=True)
class Subject:
    """One QCB model to measure."""

    name: str
    path: str
    trigger: str
    scheme: str
    carrier: str
    data: str


def zoo_subjects(names: list[str] | None) -> list[Subject]:
    """The manifest's QCB entries (optionally only `names`)."""
    return [Subject(e.name, str(zoo_path(e)), str(trigger_path(e)), e.scheme or "w8a8",
                    e.carrier or "scheme", e.dataset)
            for e in load_manifest() if e.kind == "qcb" and (not names or e.name in names)]


def file_subjects(paths: list[str]) -> list[Subject]:
    """Models written by `efrap attack` (trigger beside them, scheme and data in metadata)."""
    out = []
    for p in paths:
        meta = get_metadata(load_model(p))
        settings = json.loads(meta.get("efrap.attack.settings", "{}"))
        trigger = output_paths(p)[2]  # where `efrap attack` wrote it
        out.append(Subject(Path(p).stem, p, str(trigger),
                           meta["efrap.attack.scheme"], settings.get("carrier", "scheme"),
                           settings.get("data", "fashion-mnist")))
    return out


def measure(path: str, trigger: str, data: str, limit: int | None) -> dict[str, float]:
    """CDA and ASR (percent) of one model in onnxruntime, faithful level, CPU."""
    r = verify_model(path, VerifyOptions(data=data, trigger=trigger, limit=limit, provider="cpu"))
    assert r.clean_accuracy is not None and r.attack_success_rate is not None
    return {"cda": 100 * r.clean_accuracy, "asr": 100 * r.attack_success_rate}


def low_bit(scheme: Scheme) -> bool:
    """Whether the scheme rounds weights or activations below 8 bits."""
    return scheme.weight.bits < 8 or scheme.activation.bits < 8


def measure_subject(s: Subject, iters: int | None, seed: int, limit: int | None, tmp: str,
                    methods: tuple[str, ...] = METHODS) -> dict:
    """Every method (and the carrier check) on one model."""
    scheme = load_scheme(s.scheme)
    row: dict = {"model": s.name, "scheme": s.scheme, "carrier": s.carrier,
                 "fp": measure(s.path, s.trigger, s.data, limit)}
    for method in methods:
        config = get_method(method).defaults
        if iters is not None:
            config = replace(config, iters=iters)
        out = str(Path(tmp) / f"{s.name}.{method}.onnx")
        t0 = time.perf_counter()
        quantize_file(s.path, out, QuantizeOptions(scheme=scheme, method=method, calib=s.data,
                                                   seed=seed, rounding=config))
        row[method] = measure(out, s.trigger, s.data, limit)
        row[method]["seconds"] = round(time.perf_counter() - t0, 1)
        if method != "nearest":
            row[method]["iters"] = config.iters
        log(f"{s.name} {method}: CDA {row[method]['cda']:.2f} ASR {row[method]['asr']:.2f}")
    if low_bit(scheme):
        variants = {"weights_only": replace(scheme, activation=scheme.activation.with_bits(8)),
                    "activations_only": replace(scheme, weight=scheme.weight.with_bits(8))}
        for label, variant in variants.items():
            out = str(Path(tmp) / f"{s.name}.{label}.onnx")
            quantize_file(s.path, out, QuantizeOptions(scheme=variant, calib=s.data, seed=seed))
            row[label] = measure(out, s.trigger, s.data, limit)
    e = row["efrap"]
    row["floors_met"] = e["asr"] <= 5.0 and row["fp"]["cda"] - e["cda"] <= 2.0
    return row


def pair(m: dict | None, missing: str = "n/a (8-bit)") -> str:
    """'CDA / ASR' of a measurement, or `missing`."""
    return f"{m['cda']:.2f} / {m['asr']:.2f}" if m else missing


def render(results: list[dict], command: str, seed: int) -> str:
    """The Markdown table with its command, settings and versions."""
    rows = [[r["model"], r["scheme"], r["carrier"], pair(r["fp"]), pair(r["nearest"]),
             pair(r.get("adaround"), "not run"), pair(r["efrap"]), "met" if r["floors_met"] else "MISSED",
             pair(r.get("weights_only")), pair(r.get("activations_only"))] for r in results]
    iters = {m: next((r[m]["iters"] for r in results if m in r), None) for m in ("adaround", "efrap")}
    lines = [f"Command: `{command}`", "", "| " + " | ".join(HEADERS) + " |",
             "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", f"Iterations per layer: adaround {iters.get('adaround')}, efrap "
              f"{iters.get('efrap')}; one seed ({seed}) for every run: the 1,024 calibration "
              f"images, the values the observers sample and learned rounding's batches. Floors met on "
              f"{sum(r['floors_met'] for r in results)} of {len(results)} models.", "",
              f"Versions: {json.dumps(versions(), sort_keys=True)}"]
    return "\n".join(lines)


def replace_section(doc: Path, section: str, body: str) -> None:
    """Put `body` between the section's markers in `doc` (appended when missing)."""
    start, end = f"<!-- results:{section}:start -->", f"<!-- results:{section}:end -->"
    text = doc.read_text() if doc.exists() else "# Defense results\n"
    if start not in text:
        text = text.rstrip("\n") + f"\n\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    doc.write_text(f"{head}{start}\n{body}\n{end}{tail}")


def main() -> None:
    """Measure, print, and write the JSON and the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=None,
                        help="iterations per layer for adaround/efrap (default: each method's own)")
    parser.add_argument("--names", nargs="*", help="only these zoo entries")
    parser.add_argument("--models", nargs="*", help="held-out FP ONNX models instead of the zoo")
    parser.add_argument("--limit", type=int, default=None, help="first N test images only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="rounding methods to run (nearest and efrap are always needed)")
    parser.add_argument("--json", default=None, help="default bench/results/{results,heldout}.json")
    parser.add_argument("--doc", default=str(ROOT / "docs/RESULTS.md"))
    parser.add_argument("--merge", nargs="+", default=None,
                        help="combine the JSON files of earlier partial runs (for example two "
                             "--names halves run side by side) instead of measuring")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.json, Path(args.doc))
        return
    section = "heldout" if args.models else "zoo"
    subjects = file_subjects(args.models) if args.models else zoo_subjects(args.names)
    with tempfile.TemporaryDirectory() as tmp:
        methods = tuple(m for m in METHODS if m in {*args.methods, "nearest", "efrap"})
        results = [measure_subject(s, args.iters, args.seed, args.limit, tmp, methods)
                   for s in subjects]
    command = "python bench/results.py" + (f" --iters {args.iters}" if args.iters else "") + (
        f" --limit {args.limit}" if args.limit else "") + (
        " --models " + " ".join(Path(m).name for m in args.models) if args.models else "") + (
        " --names " + " ".join(args.names) if args.names else "") + (
        " --methods " + " ".join(methods) if set(methods) != set(METHODS) else "")
    body = render(results, command, args.seed)
    print(body)
    out = Path(args.json) if args.json else default_json(section)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"command": command, "section": section, "seed": args.seed,
                     "limit": args.limit, "results": results})
    if args.limit is None:
        replace_section(Path(args.doc), section, body)


def default_json(section: str) -> Path:
    """bench/results/results.json for the zoo, heldout.json for held-out models."""
    return ROOT / f"bench/results/{'heldout' if section == 'heldout' else 'results'}.json"


def write_json(path: Path, payload: dict) -> None:
    """The run's JSON, with versions and the runtime settings every figure used."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**payload, "versions": versions(), "opt_level": "faithful",
                                "provider": "CPUExecutionProvider"}, indent=2) + "\n")


def merge(paths: list[str], json_out: str | None, doc: Path) -> None:
    """One table from partial runs of the same section, seed and versions, zoo order kept."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    keys = {(r.get("section"), r.get("seed"), r.get("limit"), json.dumps(r["versions"], sort_keys=True))
            for r in runs}
    if len(keys) != 1:
        sys.exit("results.py --merge: the runs differ in section, seed, --limit or versions")
    section, seed, limit, _ = keys.pop()
    results = [row for r in runs for row in r["results"]]
    if section == "zoo":
        order = {e.name: i for i, e in enumerate(load_manifest())}
        results.sort(key=lambda row: order.get(row["model"], len(order)))
    command = " + ".join(f"`{r['command']}`" for r in runs).strip("`")
    body = render(results, command, seed)
    print(body)
    out = Path(json_out) if json_out else default_json(section)
    write_json(out, {"command": command, "section": section, "seed": seed, "limit": limit,
                     "results": results, "merged_from": [r["command"] for r in runs]})
    if limit is None:
        replace_section(doc, section, body)


if __name__ == "__main__":
    main()
