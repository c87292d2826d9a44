"""Defense results on QCB models, measured in onnxruntime; writes tables into docs/RESULTS.md.

Usage:
    python bench/results.py [--iters N] [--names NAME ...] [--methods M ...] [--limit N]
    python bench/results.py --models A.onnx B.onnx ... [--section NAME]   # held-out models
    python bench/results.py --merge A.json B.json    # combine partial runs (e.g. --names halves)

For each model, under the scheme its attack targets: the FP model, and the model
quantized with each method at its own settings (the release's 10,000 iterations per layer
unless --iters): `nearest`; `adaround` (reconstruction alone); `lac` (learned continuous
offsets); EFRAP's `release` preset; `unpruned`, the default preset without its rare-unit
pruning (the rule's first part; not a candidate for the winner); EFRAP's `default` preset
(the project's rule, docs/DEFENSE.md); `qvec` (QVec, its scale lambda searched on held-out
clean images, docs/DEFENSE.md "QVec"; the chosen lambda is recorded with its figures). All
verified with the model's trigger at optimization level `faithful` on the CPU provider. CDA
is clean accuracy, ASR attack success over test images whose label is not the target, both
in percent. The default defense is checked against the floors and the goals, and each
row's winner chosen, by the acceptance rule of `validators/acceptance.py` (floors: ASR at
most 5%, CDA within 2 points of FP; goals: 2% and 1 point).

Zoo entries (the default) fill the table between the `results:zoo` markers of
docs/RESULTS.md and bench/results/results.json; models given with --models (built by
`efrap attack`, trigger beside them as NAME.trigger.json, scheme from their metadata)
fill the `results:heldout` table (or --section's) and bench/results/heldout.json. Text
outside the markers is kept. Whenever a section's default JSON is written, the table
between docs/DEFENSE.md's `results:defense` markers (the default beside the release on
every measured model, stored and held out) is regenerated from all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.publish import write_results, write_section
from models.attacks.build import output_paths
from models.zoo import load_manifest, trigger_path, zoo_path
from pipeline.base.deployment import Deployment
from pipeline.base.onnx_io import get_metadata, load_model
from pipeline.base.progress import log
from pipeline.base.provenance import versions
from pipeline.base.safe_io import file_sha256
from pipeline.base.scheme import load_scheme
from pipeline.quantize import QuantizeOptions, quantize_file
from pipeline.rounding import RoundingSettings
from pipeline.rounding.adaround import ADAROUND_DEFAULTS
from pipeline.rounding.efrap import EFRAP_DEFAULT, EFRAP_FAST, EFRAP_RELEASE
from pipeline.rounding.lac import LAC_DEFAULTS
from validators.acceptance import CANDIDATES, tally, verdict, winner
from validators.verify import VerifyOptions, verify_model

ROOT = Path(__file__).resolve().parents[1]
#: Column label -> (rounding method, its settings; None: the method's own).
METHODS: dict[str, tuple[str, RoundingSettings | None]] = {
    "nearest": ("nearest", None),
    "adaround": ("adaround", ADAROUND_DEFAULTS),
    "lac": ("lac", LAC_DEFAULTS),
    "release": ("efrap", EFRAP_RELEASE),
    # The default rule's first part alone (before rare-unit pruning was added): what the
    # pruning changes, and the default's figures as they stood before it.
    "unpruned": ("efrap", replace(EFRAP_DEFAULT, prune_rare=0.0)),
    "default": ("efrap", EFRAP_DEFAULT),
    # The default rule at a cost that follows the weights (positions, fewer steps): a candidate.
    "fast": ("efrap", EFRAP_FAST),
    # QVec: no learned rounding; its scale is searched on clean held-out images.
    "qvec": ("qvec", None),
}
DEFENSE_DOC = ROOT / "docs/DEFENSE.md"
#: What a doc missing its sections starts as.
NEW_DOC = "# Defense results\n"
#: The sections whose rows docs/DEFENSE.md summarises, in order, and what each is to the
#: default rule: the stored zoo it was chosen on, and models built after it was fixed.
DEFENSE_SETS = (("zoo", "stored zoo", False),
                ("robust", "held out (reconstruction-surviving)", True),
                ("heldout", "held out", True))
#: The held-out models built after the rule's second part (rare-unit pruning) was fixed
#: (bench/heldout.toml): held out for the whole rule. Every other held-out model was
#: development data for the pruning, so it is held out for the rule's first part only.
HELD_OUT_WHOLE_RULE = frozenset({"h9_small_cnn_adaptive_w4a8", "h10_small_cnn_compartifact_w4a4",
                                 "h11_small_cnn_dormant_w4a8"})
HEADERS = ["model", "scheme", "FP CDA/ASR", "nearest CDA/ASR", "adaround CDA/ASR", "lac CDA/ASR",
           "efrap release CDA/ASR", "efrap default unpruned CDA/ASR", "efrap default CDA/ASR",
           "efrap fast CDA/ASR", "qvec CDA/ASR", "default: floors / goals", "winner"]


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
    r = verify_model(path, VerifyOptions(Deployment(data=data, provider="cpu"), trigger=trigger, limit=limit))
    assert r.clean_accuracy is not None and r.attack_success_rate is not None
    return {"cda": 100 * r.clean_accuracy, "asr": 100 * r.attack_success_rate}


def measure_subject(s: Subject, iters: int | None, seed: int, limit: int | None, tmp: str,
                    methods: tuple[str, ...] = tuple(METHODS)) -> dict:
    """Every method on one model.

    Each method's output goes to `tmp` with its per-layer checkpoint, and its figures to
    ``NAME.METHOD.row.json`` beside it, keyed by the model's sha256 and the settings: with a
    kept folder (--work) a killed run resumes from the last finished layer, and a method
    already measured is read back instead of run again.
    """
    scheme = load_scheme(s.scheme)
    row: dict = {"model": s.name, "scheme": s.scheme, "carrier": s.carrier,
                 "fp": measure(s.path, s.trigger, s.data, limit)}
    model_sha = file_sha256(s.path)
    for label in methods:
        method, config = METHODS[label]
        if config is not None and iters is not None:
            config = replace(config, iters=iters)
        out = str(Path(tmp) / f"{s.name}.{label}.onnx")
        saved = Path(tmp) / f"{s.name}.{label}.row.json"
        key = {"model_sha256": model_sha, "method": label, "iters": None if config is None else config.iters,
               "seed": seed, "limit": limit}
        if saved.exists() and json.loads(saved.read_text())["key"] == key:
            row[label] = json.loads(saved.read_text())["figures"]
            log(f"{s.name} {label}: read back from {saved.name}")
            continue
        t0 = time.perf_counter()
        summary, _ = quantize_file(s.path, out,
                                   QuantizeOptions(Deployment(scheme=scheme, data=s.data, seed=seed),
                                                   method=method, rounding=config))
        row[label] = measure(out, s.trigger, s.data, limit)
        row[label]["seconds"] = round(time.perf_counter() - t0, 1)
        if summary.resumed:  # the seconds are this run's only; the restored layers' are in the summary
            row[label]["resumed_layers"] = summary.resumed
        if config is not None:
            row[label]["iters"] = config.iters
        searched = get_metadata(load_model(out)).get("efrap.search")
        if searched is not None:
            record = json.loads(searched)
            row[label][record["setting"]] = record["chosen"]
        saved.write_text(json.dumps({"key": key, "figures": row[label]}))
        log(f"{s.name} {label}: CDA {row[label]['cda']:.2f} ASR {row[label]['asr']:.2f}")
    return row


def pair(m: dict | None, missing: str = "not run") -> str:
    """'CDA / ASR' of a measurement, or `missing`."""
    return f"{m['cda']:.2f} / {m['asr']:.2f}" if m else missing


def render(results: list[dict], command: str, seed: int) -> str:
    """The Markdown table with its command, settings and versions."""
    rows = []
    for r in results:
        rows.append([r["model"], r["scheme"], pair(r["fp"]), *(pair(r.get(m)) for m in METHODS),
                     verdict(r), winner(r)])
    iters = {m: next((r[m]["iters"] for r in results if m in r and "iters" in r[m]), None)
             for m in CANDIDATES if METHODS[m][1] is not None}
    lambdas = [f"{r['model']} {r['qvec']['lambda']:g}" for r in results if "lambda" in r.get("qvec", {})]
    met, goals = tally(results)
    lines = [f"Command: `{command}`", "", "| " + " | ".join(HEADERS) + " |",
             "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Iterations per layer: " + ", ".join(f"{m} {n}" for m, n in iters.items()) +
              f"; one seed ({seed}) for every run: the 1,024 calibration images, the values the "
              f"observers sample and learned rounding's batches. The default defense meets the floors "
              f"on {met} and the goals on {goals} of {len(results)} models.", "",
              *([f"QVec's lambda, chosen by its search (docs/DEFENSE.md, \"QVec\"): {', '.join(lambdas)}.",
                 ""] if lambdas else []),
              f"Versions: {json.dumps(versions(), sort_keys=True)}"]
    return "\n".join(lines)


def defense_summary() -> str:
    """docs/DEFENSE.md's table: the default rule beside the release on every measured model.

    Read from the sections' JSON files under bench/results/, so it always agrees with
    docs/RESULTS.md; rows where the default was not run are left out.
    """
    groups = {"zoo": "Stored zoo", "first": "Held out for the rule's first part only (development "
              "data for the pruning)", "whole": "Held out for the whole rule"}
    rows, measured = [], {key: [] for key in groups}
    for section, label, held_out in DEFENSE_SETS:
        path = default_json(section)
        results = json.loads(path.read_text())["results"] if path.exists() else []
        for r in (r for r in results if "default" in r):
            group = "whole" if r["model"] in HELD_OUT_WHOLE_RULE else "first" if held_out else "zoo"
            rows.append([r["model"], r["scheme"], label + (" (whole rule)" if group == "whole" else ""),
                         pair(r["fp"]), pair(r["default"]), pair(r.get("unpruned")),
                         pair(r.get("release")), verdict(r), winner(r)])
            measured[group].append(r)
    headers = ["model", "scheme", "set", "FP CDA/ASR", "default CDA/ASR", "default unpruned CDA/ASR",
               "release CDA/ASR", "default: floors / goals", "winner (docs/RESULTS.md)"]
    lines = ["Generated by `bench/results.py` from bench/results/{results,robust,heldout}.json "
             "(the tables of docs/RESULTS.md).", "", "| " + " | ".join(headers) + " |",
             "|" + "---|" * len(headers), *("| " + " | ".join(r) + " |" for r in rows), ""]
    for key, results in measured.items():
        if results:
            floors, goals = tally(results)
            lines.append(f"- {groups[key]}: the default meets the floors on {floors} and the goals on "
                         f"{goals} of {len(results)} models.")
    return "\n".join(lines)


def publish(out: Path, payload: dict, doc: Path, section: str, body: str) -> None:
    """Print the table and write the JSON; unless --limit cut the test set, put the table
    into `doc`, and when `out` is the section's own JSON, refresh docs/DEFENSE.md's summary."""
    print(body)
    write_results(stamped(payload), out)
    if payload["limit"] is None:
        write_section(doc, f"results:{section}", body, NEW_DOC)
        if out == default_json(section):
            write_section(DEFENSE_DOC, "results:defense", defense_summary(), NEW_DOC)


def main() -> None:
    """Measure, print, and write the JSON and the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=None,
                        help="iterations per layer for adaround/efrap (default: each method's own)")
    parser.add_argument("--names", nargs="*", help="only these zoo entries")
    parser.add_argument("--models", nargs="*", help="held-out FP ONNX models instead of the zoo")
    parser.add_argument("--limit", type=int, default=None, help="first N test images only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=tuple(METHODS),
                        help="methods to run (nearest is always run)")
    parser.add_argument("--section", default=None, help="the section of --doc to fill (default: "
                        "zoo, or heldout with --models)")
    parser.add_argument("--json", default=None, help="default bench/results/{results,heldout}.json")
    parser.add_argument("--doc", default=str(ROOT / "docs/RESULTS.md"))
    parser.add_argument("--merge", nargs="+", default=None,
                        help="combine the JSON files of earlier partial runs instead of measuring: "
                             "other models (two --names halves run side by side) or other methods "
                             "on the same models")
    parser.add_argument("--work", default=None,
                        help="keep every output, its per-layer checkpoint and its figures in this "
                        "folder, so a killed run resumes where it stopped (default: a temporary folder)")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.json, Path(args.doc))
        return
    section = args.section or ("heldout" if args.models else "zoo")
    subjects = file_subjects(args.models) if args.models else zoo_subjects(args.names)
    methods = tuple(m for m in METHODS if m in {*args.methods, "nearest"})
    with contextlib.ExitStack() as stack:
        work = args.work or stack.enter_context(tempfile.TemporaryDirectory())
        Path(work).mkdir(parents=True, exist_ok=True)
        results = [measure_subject(s, args.iters, args.seed, args.limit, work, methods)
                   for s in subjects]
    command = "python bench/results.py" + (f" --iters {args.iters}" if args.iters else "") + (
        f" --limit {args.limit}" if args.limit else "") + (
        " --models " + " ".join(Path(m).name for m in args.models) if args.models else "") + (
        " --names " + " ".join(args.names) if args.names else "") + (
        " --methods " + " ".join(methods) if set(methods) != set(METHODS) else "")
    out = Path(args.json) if args.json else default_json(section)
    publish(out, {"command": command, "section": section, "seed": args.seed,
                  "limit": args.limit, "results": results},
            Path(args.doc), section, render(results, command, args.seed))


def default_json(section: str) -> Path:
    """bench/results/results.json for the zoo, SECTION.json for any other section."""
    return ROOT / f"bench/results/{'results' if section == 'zoo' else section}.json"


def stamped(payload: dict) -> dict:
    """The run's JSON, with versions and the runtime settings every figure used."""
    return {**payload, "versions": versions(), "opt_level": "faithful", "provider": "CPUExecutionProvider"}


def combine_rows(rows: list[dict]) -> list[dict]:
    """One row per model: the methods of runs on the same model side by side.

    Figures that two runs both measured (FP, nearest, a method run twice) must agree, since
    every run is deterministic for its seed; otherwise the runs are not comparable.
    """
    out: dict[str, dict] = {}
    for row in rows:
        have = out.setdefault(row["model"], {})
        for key, value in row.items():
            if key in have and isinstance(value, dict) and "cda" in value:
                if (have[key]["cda"], have[key]["asr"]) != (value["cda"], value["asr"]):
                    sys.exit(f"results.py --merge: {row['model']} {key} differs between the runs")
            elif key in have and key not in ("model", "scheme", "carrier") and have[key] != value:
                sys.exit(f"results.py --merge: {row['model']} {key} differs between the runs")
            have.setdefault(key, value)
    return list(out.values())


def merge(paths: list[str], json_out: str | None, doc: Path) -> None:
    """One table from partial runs of the same section, seed and versions, zoo order kept."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    keys = {(r.get("section"), r.get("seed"), r.get("limit"), json.dumps(r["versions"], sort_keys=True))
            for r in runs}
    if len(keys) != 1:
        sys.exit("results.py --merge: the runs differ in section, seed, --limit or versions")
    section, seed, limit, _ = keys.pop()
    results = combine_rows([row for r in runs for row in r["results"]])
    if section == "zoo":
        order = {e.name: i for i, e in enumerate(load_manifest())}
        results.sort(key=lambda row: order.get(row["model"], len(order)))
    command = " + ".join(f"`{r['command']}`" for r in runs).strip("`")
    out = Path(json_out) if json_out else default_json(section)
    publish(out, {"command": command, "section": section, "seed": seed, "limit": limit,
                  "results": results, "merged_from": [r["command"] for r in runs]},
            doc, section, render(results, command, seed))


if __name__ == "__main__":
    main()
