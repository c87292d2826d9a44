"""The audit on rounding-only backdoors and on legitimate learned rounding; writes a table into
docs/GATE.md and bench/results/audit.json.

Usage:
    python bench/audit_table.py [--scheme w4a8] [--qura-iters 1000] [--heldout PATH ...] [--budget S]

For each clean FP model (the stored fmnist_small_cnn_clean, and every --heldout model that
exists; by default ~/.cache/efrap-onnx/heldout/c1_small_cnn_w100.onnx), under one scheme:

1. QuRA: `efrap attack --method qura --model FP.onnx --scheme S` (the attacker is the
   quantizer; the trigger is the EFRAP setting's patch, target 0);
2. the outputs a defender or an honest third party writes: `efrap quantize --method nearest`,
   `efrap quantize --method adaround` and `efrap defend` (EFRAP), same scheme;
3. each one verified in onnxruntime with QuRA's trigger (`efrap verify Q --trigger T`: CDA
   and ASR on the test split, faithful level, CPU), and audited against its FP source
   (`efrap audit FP Q --scheme S`: rounding statistics, grid check, scan with Q as the
   quantized side, verdict).

Every step is an `efrap` child process (bench/child.py) whose exact command is recorded;
outputs go to --work (default ~/.cache/efrap-onnx/audit) and a step whose output is
already there is not run again (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.child import run_child
from bench.publish import portable_text, write_results, write_section
from pipeline.base.progress import log
from pipeline.base.provenance import versions
from validators.report import pct

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "efrap-onnx"
CLEAN = ROOT / "models" / "zoo" / "fmnist_small_cnn_clean.onnx"
DEFAULT_HELDOUT = CACHE / "heldout" / "c1_small_cnn_w100.onnx"
VARIANTS = ("qura", "nearest", "adaround", "efrap")
def _run(argv: list[str], out: Path, log_file: Path, ok: tuple[int, ...] = (0,)) -> dict:
    """Run `efrap ARGV` unless `out` exists; the command line and how it went.

    How a step went is kept beside its output (OUT.run.json), so a resumed bench still
    reports every step's time.
    """
    command = portable_text("efrap " + " ".join(str(a) for a in argv))
    record = out.with_name(out.name + ".run.json")
    if out.exists() and record.exists():
        return {**json.loads(record.read_text()), "cached": True}
    log(f"bench: {command}")
    run = run_child(["-m", "pipeline.cli.main", *[str(a) for a in argv]], log_file)
    if run.exit not in ok:
        raise SystemExit(f"bench: `{command}` exited {run.exit}: {run.last_line}")
    done = {"command": command, "exit": run.exit, "seconds": run.seconds, "peak_mib": run.peak_mib}
    record.write_text(json.dumps(done, sort_keys=True) + "\n")
    return done


def build(fp: Path, work: Path, scheme: str, qura_iters: int) -> dict[str, dict]:
    """The four QDQ models of one FP model and how each was made."""
    stem = fp.stem
    made: dict[str, dict] = {}
    for variant in VARIANTS:
        out = work / f"{stem}.{variant}.{scheme}.onnx"
        if variant == "qura":
            argv = ["attack", "--method", "qura", "--model", fp, "--scheme", scheme, "--iters", qura_iters,
                    "-o", out]
        elif variant == "efrap":
            argv = ["defend", fp, "--scheme", scheme, "-o", out]
        else:
            argv = ["quantize", fp, "--scheme", scheme, "--method", variant, "-o", out]
        made[variant] = {"path": portable_text(str(out)), **_run(argv, out, work / f"{out.stem}.log")}
    return made


def measure(fp: Path, made: dict[str, dict], work: Path, scheme: str, budget: float | None) -> dict:
    """Verify (with QuRA's trigger) and audit every model of one FP model."""
    qura = work / f"{fp.stem}.qura.{scheme}.onnx"
    trigger = qura.with_name(qura.stem + ".trigger.json")
    rows: dict[str, dict] = {}
    for name, q in [("fp", {"path": portable_text(str(fp))}), *made.items()]:
        path = fp if name == "fp" else work / f"{fp.stem}.{name}.{scheme}.onnx"
        verify_json = work / f"{path.stem}.verify.json"
        verify = _run(["verify", path, "--trigger", trigger, "--provider", "cpu", "--json", verify_json],
                      verify_json, work / f"{path.stem}.verify.log")
        v = json.loads(verify_json.read_text())
        row = {"made": q, "verify": {"command": verify["command"], "clean_accuracy": v["clean_accuracy"],
                                     "attack_success_rate": v["attack_success_rate"],
                                     "sha256": v["model_sha256"], "opt_level": v["opt_level"],
                                     "provider": v["provider"], "images": v["images"], "data": v["data"]}}
        if name != "fp":
            audit_json = work / f"{path.stem}.audit.json"
            argv = ["audit", fp, path, "--scheme", scheme, "--calib", "fashion-mnist", "--provider", "cpu",
                    "--json", audit_json] + (["--budget", budget] if budget else [])
            audit = _run(argv, audit_json, work / f"{path.stem}.audit.log", ok=(0, 1))
            a = json.loads(audit_json.read_text())
            row["audit"] = {"command": audit["command"], "seconds": audit.get("seconds"),
                            "verdict": a["verdict"], "flagged": a["flagged"], "reasons": a["reasons"],
                            "warnings": a["warnings"], "evidence": a["evidence"],
                            "off_nearest_fraction": a["rounding"]["off_nearest_fraction"],
                            "max_steps": a["rounding"]["max_steps"],
                            "beyond_one_step": a["rounding"]["beyond_one_step"],
                            "non_standard_grids": a["rounding"]["non_standard_grids"],
                            "per_layer_off_nearest": {r["layer"]: r["off_nearest_fraction"]
                                                      for r in a["rounding"]["layers"]},
                            "scan_seconds": a["scan"].get("seconds"),
                            "scan_cut_short": a["scan"].get("cut_short")}
        rows[name] = row
    return rows


def _pct(v: float | None) -> str:
    """A fraction in percent for a cell whose header says so (no % sign)."""
    return pct(v, "n/a", unit="")


def render(results: dict[str, dict], scheme: str, command: str) -> str:
    """The Markdown table."""
    head = ["FP model", "Q", "CDA", "ASR (QuRA trigger)", "off nearest", "max steps", "non-standard grids",
            "recovered trigger ASR FP / nearest / Q", "fresh search against Q (class: ASR Q / FP)",
            "audit verdict"]
    lines = [f"Command: `{command}`; scheme {scheme}; figures from onnxruntime (faithful, CPU) on the "
             "Fashion-MNIST test split (CDA, ASR on non-target images, %) and, for the scan, on 1,000 "
             "held-out training images.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fp_name, rows in results.items():
        for name, row in rows.items():
            v = row["verify"]
            a = row.get("audit")
            if a is None:
                lines.append(f"| {fp_name} | FP | {_pct(v['clean_accuracy'])} | "
                             f"{_pct(v['attack_success_rate'])} | - | - | - | - | - | - |")
                continue
            ev = a["evidence"]
            fresh = (f"{ev['fresh_target']}: {_pct(ev['fresh_asr'])} / {_pct(ev['fresh_asr_fp'])}"
                     if ev["fresh_found"] else "none flagged")
            verdict = f"**{a['verdict']}**" if a["flagged"] else a["verdict"]
            lines.append(
                f"| {fp_name} | {name} | {_pct(v['clean_accuracy'])} | {_pct(v['attack_success_rate'])} | "
                f"{_pct(a['off_nearest_fraction'])}% | {a['max_steps']} | {len(a['non_standard_grids'])} | "
                f"{_pct(ev['asr_fp'])} / {_pct(ev['asr_nearest'])} / {_pct(ev['asr_quantized'])} | {fresh} | "
                f"{verdict} |")
    lines += ["", f"Versions: {json.dumps(versions(), sort_keys=True)}"]
    return "\n".join(lines)


def main() -> None:
    """Build, verify, audit; print and write the table and the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default="w4a8")
    parser.add_argument("--qura-iters", type=int, default=1000)
    parser.add_argument("--heldout", nargs="*", default=[str(DEFAULT_HELDOUT)],
                        help="held-out clean FP models (those that do not exist are skipped and listed)")
    parser.add_argument("--budget", type=float, default=None, help="time limit of each audit's scan (s)")
    parser.add_argument("--work", default=str(CACHE / "audit"))
    parser.add_argument("--json", default=str(ROOT / "bench/results/audit.json"))
    parser.add_argument("--doc", default=str(ROOT / "docs/GATE.md"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = [CLEAN] + [Path(p) for p in args.heldout if Path(p).is_file()]
    missing = [p for p in args.heldout if not Path(p).is_file()]
    results = {}
    for fp in models:
        made = build(fp, work, args.scheme, args.qura_iters)
        results[fp.stem] = measure(fp, made, work, args.scheme, args.budget)
    command = (f"python bench/audit_table.py --scheme {args.scheme} --qura-iters {args.qura_iters}"
               + (f" --budget {args.budget:g}" if args.budget else "")
               + "".join(f" --heldout {Path(p).name}" for p in args.heldout))
    body = render(results, args.scheme, command)
    if missing:
        body += "\n\nHeld-out models not found (not measured): " + ", ".join(Path(p).name for p in missing)
    body = portable_text(body)
    print(body)
    write_results({"command": command, "scheme": args.scheme, "qura_iters": args.qura_iters,
                   "missing_heldout": missing, "results": results, "versions": versions()}, args.json)
    write_section(Path(args.doc), "audit:table", body)


if __name__ == "__main__":
    main()
