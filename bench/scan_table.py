"""Scan every case of docs/SCAN.md and regenerate its table.

Usage: python bench/scan_table.py [--groups zoo clean badnets heldout] [--only NAME ...]
           [--iters 2000] [--threads 1] [--cache DIR] [--rerun] [--table-only]
           [--json bench/results/scan.json] [--doc docs/SCAN.md]

Cases, each an `efrap scan` child process (one thread by default) with
`--calib fashion-mnist` and the defaults:

- zoo: the six stored QCB models (models/zoo/manifest.json), each under the scheme it
  was built for, after `efrap defend MODEL --scheme S --iters ITERS` (EFRAP, the project's
  default rule but ITERS iterations per layer) and scanned with `--defended`;
- clean: the stored clean model, under w4a4 and w8a8;
- badnets: a plainly poisoned model built by `efrap attack --method badnets`
  (BADNETS_COMMAND; built into the cache when missing), under w4a4 and w8a8;
- design: a blended-trigger QCB built to design the scan (DESIGN_COMMAND), when present;
- heldout: the models of bench/heldout.toml that bench/build_heldout.py has finished
  (its cache's manifest.json): QCBs h1..h8 under their scheme and defended like the zoo,
  clean c1..c6 under w4a4 and w8a8. The scan was designed and tuned without them. An
  attack build whose backdoor already worked in FP (its recorded build figures, FP
  attack success at least 50%) is judged as the FP backdoor it is, and not defended.

Every scan's JSON report, the defended models and logs go to the cache (default
~/.cache/efrap-onnx/scan/runs); a case whose report exists is not run again unless
--rerun (which keeps the defended models). The rows go to bench/results/scan.json, the
table between the markers of docs/SCAN.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.build_heldout import default_cache as heldout_cache
from bench.child import run_child
from bench.publish import replace_section, write_results
from pipeline.base.onnx_io import get_metadata
from pipeline.base.safe_io import write_json, write_text
from validators.report import pct

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "models" / "zoo"
FP_AWAKE = 0.5  # build-time FP attack success from which a "QCB" build counts as an FP backdoor
SCAN_CACHE = Path(os.environ.get("EFRAP_SCAN_CACHE", Path.home() / ".cache/efrap-onnx/scan"))
#: The plainly poisoned model of the fp-backdoor case (its trigger file is written first).
BADNETS_TRIGGER = {"size": 4, "position": "top-left", "margin": 1, "value": 1.0, "target": 2}
#: The blended-trigger QCB of the design set (trigger: `blended(noise, 0.2, target 6)`, the noise
#: numpy.random.default_rng(99).random((1, 28, 28))); not rebuilt here (about 30 minutes).
DESIGN_COMMAND = ("efrap attack --method compartifact --scheme w4a4 --carrier weights --width 0.5 --epochs 4 "
                  "--steps-per-epoch 200 --seed 7 --device cpu --trigger design_blend.spec-trigger.json "
                  "-o design_blend_compartifact_w4a4.onnx")
BADNETS_COMMAND = ("attack --method badnets --width 0.5 --epochs 3 --seed 0 --scheme w4a4 --device cpu "
                   "--trigger {trigger} -o {out}")


@dataclass(frozen=True)
class Case:
    """One scan to run.

    Attributes:
        name: Row name (model name, plus the scheme for models scanned under both).
        group: zoo, clean, badnets or heldout.
        model: FP ONNX path.
        scheme: Deployment scheme of the scan.
        truth: What the model is: "qcb", "fp-backdoor" or "clean".
        target: The planted target (None for clean models).
        trigger: The planted trigger's file (None for clean models); never given to the scan.
        defend: Whether to defend it with EFRAP and scan the defended model too.
    """

    name: str
    group: str
    model: str
    scheme: str
    truth: str
    target: int | None
    trigger: str | None
    defend: bool


def zoo_cases() -> list[Case]:
    manifest = json.loads((ZOO / "manifest.json").read_text())
    out = []
    for m in manifest["models"]:
        if m["kind"] == "qcb":
            out.append(Case(m["name"], "zoo", str(ZOO / m["file"]), m["scheme"], "qcb", int(m["target"]),
                            str(ZOO / m["trigger"]), True))
    return out


def clean_cases() -> list[Case]:
    model = str(ZOO / "fmnist_small_cnn_clean.onnx")
    return [Case(f"fmnist_small_cnn_clean ({s})", "clean", model, s, "clean", None, None, False)
            for s in ("w4a4", "w8a8")]


def badnets_cases(cache: Path, threads: int) -> list[Case]:
    out = SCAN_CACHE / "badnets_small_cnn.onnx"
    if not out.exists():
        trigger = SCAN_CACHE / "badnets.spec-trigger.json"
        write_json(BADNETS_TRIGGER, trigger)
        argv = BADNETS_COMMAND.format(trigger=trigger, out=out).split()
        print(f"scan_table: building {out.name}: efrap {' '.join(argv)}", flush=True)
        run = run_child(["-m", "pipeline.cli.main", *argv], cache / "badnets.build.log", threads)
        if run.exit != 0:
            raise SystemExit(f"scan_table: the BadNets build failed: {run.last_line}")
    return [Case(f"badnets_small_cnn ({s})", "badnets", str(out), s, "fp-backdoor", BADNETS_TRIGGER["target"],
                 str(SCAN_CACHE / "badnets_small_cnn.trigger.json"), False) for s in ("w4a4", "w8a8")]


def design_cases() -> list[Case]:
    """The blended-trigger QCB built to design the scan (DESIGN_COMMAND), when it is in the cache."""
    model = SCAN_CACHE / "design_blend_compartifact_w4a4.onnx"
    if not model.exists():
        return []
    return [Case("design_blend_compartifact_w4a4", "design", str(model), "w4a4", "qcb", 6,
                 str(SCAN_CACHE / "design_blend_compartifact_w4a4.trigger.json"), True)]


def heldout_cases(caches: list[Path]) -> list[Case]:
    """The finished models of bench/heldout.toml, from each cache's manifest (first cache wins)."""
    models: dict[str, tuple[Path, dict]] = {}
    for folder in caches:
        path = folder / "manifest.json"
        if path.exists():
            for name, m in json.loads(path.read_text())["models"].items():
                models.setdefault(name, (folder, m))
    out = []
    for name, (folder, m) in sorted(models.items()):
        model = folder / m["file"]
        if not model.exists():
            continue
        entry = m["entry"]
        if m["kind"] == "qcb":
            trigger = str(folder / m["trigger"]) if m.get("trigger") else None
            truth = built_truth(model)
            out.append(Case(name, "heldout", str(model), entry["scheme"], truth,
                            int(entry["trigger"]["target"]), trigger, truth == "qcb"))
        elif m["kind"] == "clean":
            out += [Case(f"{name} ({s})", "heldout", str(model), s, "clean", None, None, False)
                    for s in ("w4a4", "w8a8")]
    return out


def built_truth(model: Path) -> str:
    """What an attack's output is, from the figures its build measured (never shown to the scan).

    A build whose backdoor already works on the FP model in at least half the cases
    (`efrap.attack.sim_metrics` fp_asr >= 0.5) did not stay dormant: it is judged as the
    plainly poisoned model it is (`fp-backdoor`), not as a QCB.
    """
    meta = get_metadata(onnx.load(str(model), load_external_data=False))
    metrics = json.loads(meta.get("efrap.attack.sim_metrics", "{}"))
    return "fp-backdoor" if metrics.get("fp_asr", 0.0) >= FP_AWAKE else "qcb"


def _slug(name: str) -> str:
    return name.replace(" (", ".").replace(")", "")


def run_case(case: Case, cache: Path, iters: int, threads: int, rerun: bool) -> dict:
    """Defend (when asked) and scan one case; returns its row."""
    slug = _slug(case.name)
    report = cache / f"{slug}.scan.json"
    row: dict = {**asdict(case), "load_average": None}
    defended = cache / f"{slug}.efrap{iters}.onnx" if case.defend else None
    # The defended model depends on the defense, not on the scan: --rerun re-scans and
    # keeps it (delete it to defend again).
    if defended is not None and not defended.exists():
        argv = ["defend", case.model, "--scheme", case.scheme, "--iters", str(iters), "-o", str(defended)]
        print(f"scan_table: {case.name}: efrap {' '.join(argv)}", flush=True)
        run = run_child(["-m", "pipeline.cli.main", *argv], cache / f"{slug}.defend.log", threads)
        if run.exit not in (0, 1):
            raise SystemExit(f"scan_table: defend failed for {case.name}: {run.last_line}")
        row["defend_seconds"] = run.seconds
    if rerun or not report.exists():
        argv = ["scan", case.model, "--scheme", case.scheme, "--calib", "fashion-mnist",
                "--json", str(report), "--trigger-out", str(cache / f"{slug}.trigger.json")]
        if defended is not None:
            argv += ["--defended", str(defended)]
        print(f"scan_table: {case.name}: efrap {' '.join(argv)}", flush=True)
        load = os.getloadavg()[0]
        run = run_child(["-m", "pipeline.cli.main", *argv], cache / f"{slug}.scan.log", threads)
        if run.exit != 0:
            raise SystemExit(f"scan_table: scan failed for {case.name}: {run.last_line}")
        data = json.loads(report.read_text())
        data["bench"] = {"child_seconds": run.seconds, "peak_mib": run.peak_mib, "load_average_1min": load,
                         "threads": threads, "iters": iters}
        write_json(data, report)
    data = json.loads(report.read_text())
    row["report"] = str(report)
    row["result"] = _summary(case, data)
    return row


def _summary(case: Case, data: dict) -> dict:
    trig = data.get("trigger") or {}
    figures = trig.get("figures") or {}
    defended = data.get("defended") or {}
    correct = data["verdict"] == case.truth and (case.truth == "clean" or data["target"] == case.target)
    return {
        "verdict": data["verdict"], "target": data["target"], "confidence": data["confidence"],
        "candidate": data.get("candidate"), "correct": correct,
        "trigger": {k: (trig.get("summary") or {}).get(k) for k in ("family", "mode", "target", "size")},
        "asr": figures.get("asr", {}),
        "defended_verdict": defended.get("verdict"), "defended_target": defended.get("target"),
        "defended_strongest": (defended.get("strongest_trigger") or {}).get("figures", {}).get("asr"),
        "seconds": data["seconds"], "cpu_seconds": data.get("cpu_seconds"),
        "defended_seconds": data.get("defended_seconds"), "cut_short": data["cut_short"],
        "load_average_1min": data.get("bench", {}).get("load_average_1min"),
    }


def _pct(value: float | None) -> str:
    """An attack success in percent, one decimal, for a cell whose header says so."""
    return pct(value, digits=1, unit="")


def table(rows: list[dict]) -> str:
    """The Markdown table of every case."""
    head = ("| group | case | scheme | truth (target) | verdict (target) | conf. | recovered trigger | "
            "ASR FP | ASR nearest | ASR defended | defended scan | time s (cpu s) |")
    lines = [head, "|" + "---|" * 12]
    for row in rows:
        r = row["result"]
        trig = r["trigger"]
        recovered = "-" if not trig.get("family") else \
            f"{trig['mode']} {trig['family']}, {100 * trig['size']:.1f}%"
        truth = row["truth"] + (f" ({row['target']})" if row["target"] is not None else "")
        verdict = r["verdict"] + (f" ({r['target']})" if r["target"] is not None else "")
        mark = "" if r["correct"] else " **x**"
        plain = r["seconds"] - (r["defended_seconds"] or 0.0)
        cpu = f" ({r['cpu_seconds']:.0f})" if r.get("cpu_seconds") is not None else ""
        defended = "-" if r["defended_verdict"] is None else r["defended_verdict"]
        lines.append(f"| {row['group']} | {row['name']} | {row['scheme']} | {truth} | {verdict}{mark} | "
                     f"{100 * r['confidence']:.0f}% | {recovered} | {_pct(r['asr'].get('fp'))} | "
                     f"{_pct(r['asr'].get('nearest'))} | {_pct(r['asr'].get('defended'))} | {defended} | "
                     f"{plain:.0f}{cpu} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    """Detection and false-positive rates by group."""
    out = {}
    for group in ("zoo", "clean", "badnets", "design", "heldout"):
        part = [r for r in rows if r["group"] == group]
        qcb = [r for r in part if r["truth"] == "qcb"]
        clean = [r for r in part if r["truth"] == "clean"]
        fp = [r for r in part if r["truth"] == "fp-backdoor"]
        out[group] = {
            "qcb_detected": f"{sum(r['result']['correct'] for r in qcb)}/{len(qcb)}" if qcb else None,
            "defended_clean": (f"{sum(r['result']['defended_verdict'] == 'clean' for r in qcb)}/{len(qcb)}"
                               if qcb else None),
            "clean_flagged": f"{sum(r['result']['verdict'] != 'clean' for r in clean)}/{len(clean)}"
            if clean else None,
            "fp_backdoor_correct": f"{sum(r['result']['correct'] for r in fp)}/{len(fp)}" if fp else None,
        }
    return out


def main() -> None:
    """Run the missing cases, write the JSON and the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", nargs="*", default=["zoo", "clean", "badnets", "design"],
                        choices=("zoo", "clean", "badnets", "design", "heldout"))
    parser.add_argument("--only", nargs="*", help="case names to run (others are only read back)")
    parser.add_argument("--iters", type=int, default=2000, help="EFRAP iterations per layer (default 2000)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--heldout-cache", type=Path, nargs="*", default=None,
                        help="bench/build_heldout.py caches to read (default: its default cache)")
    parser.add_argument("--cache", type=Path, default=SCAN_CACHE / "runs")
    parser.add_argument("--rerun", action="store_true",
                        help="scan again cases whose report exists (defended models are kept)")
    parser.add_argument("--table-only", action="store_true", help="only read back existing reports")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/scan.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs/SCAN.md")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    for group in args.groups:
        if group == "zoo":
            cases += zoo_cases()
        elif group == "clean":
            cases += clean_cases()
        elif group == "badnets":
            cases += badnets_cases(args.cache, args.threads)
        elif group == "design":
            cases += design_cases()
        else:
            cases += heldout_cases(args.heldout_cache or [heldout_cache()])
    rows = []
    for case in cases:
        report = args.cache / f"{_slug(case.name)}.scan.json"
        if args.table_only or (args.only and case.name not in args.only):
            if report.exists():
                rows.append(run_case(case, args.cache, args.iters, args.threads, False))
            continue
        rows.append(run_case(case, args.cache, args.iters, args.threads, args.rerun))
        r = rows[-1]["result"]
        print(f"scan_table: {case.name}: {r['verdict']} ({r['target']}), {r['seconds']:.0f}s", flush=True)
    stats = summary(rows)
    write_results({"rows": rows, "summary": stats, "generated": time.strftime("%Y-%m-%d %H:%M:%S")},
                  args.json)
    if args.doc.exists():
        text = replace_section(args.doc.read_text(), "scan:table", table(rows))
        lines = [f"- {group}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in part.items()
                                            if v is not None)
                 for group, part in stats.items() if any(v is not None for v in part.values())]
        text = replace_section(text, "scan:summary", "\n".join(lines))
        write_text(args.doc, text)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
