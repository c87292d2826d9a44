"""Defense results on every stored QCB model, measured in onnxruntime; writes docs/RESULTS.md.

Usage: python bench/results.py [--iters N] [--names NAME ...] [--limit N]
           [--json bench/results/results.json] [--doc docs/RESULTS.md]

For each zoo entry of kind "qcb", under the scheme it targets: the FP model, and the
model quantized with `nearest`, `adaround` and `efrap` (each with its own defaults,
except --iters), all verified with the entry's trigger at optimization level
`faithful` on the CPU provider. CDA is clean accuracy, ASR attack success over test
images whose label is not the target, both in percent. Floors checked: EFRAP ASR at
most 5% and CDA within 2 points of FP.

Carrier check: nearest rounding with only the weights at the scheme's bit-width
(activations at 8 bits) and with only the activations at it (weights at 8 bits) shows
whether a backdoor rides on weight rounding, which weight-rounding defenses (AdaRound,
EFRAP) can change, or on activation rounding, which they cannot.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from models.zoo import load_manifest, trigger_path, zoo_path
from pipeline.progress import log
from pipeline.provenance import versions
from pipeline.quantize import QuantizeOptions, quantize_file
from pipeline.rounding import get_method
from pipeline.scheme import load_scheme
from validators.report import table
from validators.verify import VerifyOptions, verify_model

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("nearest", "adaround", "efrap")
FINDINGS = "<!-- findings -->"


def measure(path: str, trigger: str, data: str, limit: int | None) -> dict[str, float]:
    """CDA and ASR (percent) of one model in onnxruntime, faithful level, CPU."""
    r = verify_model(path, VerifyOptions(data=data, trigger=trigger, limit=limit, provider="cpu"))
    return {"cda": 100 * r["clean_accuracy"], "asr": 100 * r["attack_success_rate"]}


def main() -> None:
    """Measure and write the JSON and the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=None,
                        help="iterations per layer for adaround/efrap (default: each method's own)")
    parser.add_argument("--names", nargs="*", help="only these zoo entries")
    parser.add_argument("--limit", type=int, default=None, help="first N test images only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(ROOT / "bench/results/results.json"))
    parser.add_argument("--doc", default=str(ROOT / "docs/RESULTS.md"))
    args = parser.parse_args()
    entries = [e for e in load_manifest() if e.kind == "qcb" and (not args.names or e.name in args.names)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for entry in entries:
            fp, trig = str(zoo_path(entry)), str(trigger_path(entry))
            scheme = load_scheme(entry.scheme or "w8a8")
            row = {"model": entry.name, "attack": entry.attack, "scheme": entry.scheme,
                   "carrier": entry.carrier,
                   "architecture": entry.architecture, "fp": measure(fp, trig, entry.dataset, args.limit)}
            for method in METHODS:
                config = get_method(method).defaults
                if args.iters is not None:
                    config = replace(config, iters=args.iters)
                out = str(Path(tmp) / f"{entry.name}.{method}.onnx")
                t0 = time.perf_counter()
                quantize_file(fp, out, QuantizeOptions(scheme=scheme, method=method, calib=entry.dataset,
                                                       seed=args.seed, rounding=config))
                row[method] = measure(out, trig, entry.dataset, args.limit)
                row[method]["seconds"] = round(time.perf_counter() - t0, 1)
                if method != "nearest":
                    row[method]["iters"] = config.iters
                log(f"{entry.name} {method}: CDA {row[method]['cda']:.2f} ASR {row[method]['asr']:.2f}")
            carriers = {"weights_only": replace(scheme, activation=scheme.activation.with_bits(8)),
                        "activations_only": replace(scheme, weight=scheme.weight.with_bits(8))}
            for label, variant in carriers.items():
                out = str(Path(tmp) / f"{entry.name}.{label}.onnx")
                quantize_file(fp, out, QuantizeOptions(scheme=variant, calib=entry.dataset, seed=args.seed))
                row[label] = measure(out, trig, entry.dataset, args.limit)
            e = row["efrap"]
            row["floors_met"] = e["asr"] <= 5.0 and row["fp"]["cda"] - e["cda"] <= 2.0
            results.append(row)
    headers = ["model", "scheme", "carrier", "FP CDA/ASR", "nearest CDA/ASR", "adaround CDA/ASR",
               "efrap CDA/ASR", "floors", "nearest, low-bit weights only",
               "nearest, low-bit activations only"]

    def pair(m: dict) -> str:
        return f"{m['cda']:.2f} / {m['asr']:.2f}"

    rows = [[r["model"], r["scheme"], r["carrier"], pair(r["fp"]), pair(r["nearest"]), pair(r["adaround"]),
             pair(r["efrap"]), "met" if r["floors_met"] else "MISSED", pair(r["weights_only"]),
             pair(r["activations_only"])] for r in results]
    print(table(headers, rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/results.py" + (f" --iters {args.iters}" if args.iters else "") + (
        f" --limit {args.limit}" if args.limit else "")
    out.write_text(json.dumps({"command": command, "results": results, "versions": versions(),
                               "opt_level": "faithful", "provider": "CPUExecutionProvider"},
                              indent=2) + "\n")
    md = ["# Defense results", "",
          "Generated by `bench/results.py`; every figure is measured by running the model in",
          "onnxruntime (CPU provider, optimizations off: the exact QDQ semantics) on the",
          "Fashion-MNIST test set. CDA: clean accuracy; ASR: attack success over test images whose",
          "label is not the target; both in percent. Each model is quantized under the scheme its",
          "attack targets. Floors: EFRAP ASR <= 5% and CDA within 2 points of FP.", "",
          "Carrier: what the attack let the backdoor ride on (`efrap attack --carrier`).",
          "`weights`: the backdoor needs the weight rounding (EFRAP's threat model; the",
          "paper quantizes weights only). `scheme`: any rounding of the scheme, activation",
          "rounding included, which no weight-rounding defense can change.", "",
          f"Command: `{command}`", "", "| " + " | ".join(headers) + " |",
          "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    iters = {m: results[0][m].get("iters") for m in ("adaround", "efrap")} if results else {}
    md += ["", f"Iterations per layer: adaround {iters.get('adaround')}, efrap {iters.get('efrap')}; "
           "1,024 calibration images; seed " + str(args.seed) + ".", "",
           f"Versions: {json.dumps(versions(), sort_keys=True)}", ""]
    doc = Path(args.doc)
    # Hand-written findings below the marker survive regeneration.
    if doc.exists() and FINDINGS in doc.read_text():
        md.append(doc.read_text()[doc.read_text().index(FINDINGS):].rstrip("\n"))
        md.append("")
    doc.write_text("\n".join(md))


if __name__ == "__main__":
    main()
