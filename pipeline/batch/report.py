"""The batch's summary: results.csv, results.json and index.html in --out, and a text table.

One row per model of the manifest, in its order: whether this run computed it or found
it done, the scan's verdict, the check against FP (agreement on held-out images), the
gate, clean accuracy (CDA) and attack success (ASR, where a trigger is known) of the FP
model and of the output, file sizes and times. CSV and JSON keep the fractions as
measured; the HTML index and the text table show percentages.
"""

from __future__ import annotations

import csv
import html
import io
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.base.errors import one_line
from pipeline.base.safe_io import write_json, write_text
from pipeline.batch.job import LOG_FILE, OUTPUT_FILE, RESULT_FILE
from pipeline.batch.manifest import Manifest
from pipeline.batch.store import SUMMARY_FILES, Store
from validators.report import pct, table

COLUMNS = ("name", "status", "this_run", "step", "method", "scheme", "scan", "scan_target", "check", "gate",
           "fp_cda", "fp_asr", "cda", "asr", "agreement", "fp_bytes", "out_bytes", "seconds",
           "quantize_s", "verify_s", "threads", "device", "error")
#: Text that a spreadsheet would run as a formula when a cell starts with it.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class BatchRun:
    """What one batch run did.

    Attributes:
        manifest: The manifest file.
        out: The output folder.
        runner: How it ran ("local, 2 jobs x 1 thread", "ray auto, ...").
        records: Each model's result record, in the manifest's order.
        computed: Names of the models this run computed.
        skipped: Names of the models whose stored result this run reused.
        seconds: Wall time of the run.
    """

    manifest: str
    out: str
    runner: str
    records: tuple[dict[str, Any], ...]
    computed: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    seconds: float = 0.0
    rows: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    @property
    def exit_code(self) -> int:
        """0 when every model ran and passed its check and gate, else 1."""
        return 0 if all(r.get("status") == "done" and r.get("passed") for r in self.records) else 1


def _verdict(passed: object) -> str:
    return "-" if passed is None else ("passed" if passed else "FAILED")


def row(record: dict[str, Any], this_run: str) -> dict[str, Any]:
    """The table's row of one result record."""
    scan = record.get("scan") or {}
    fp, out, check = record.get("fp") or {}, record.get("output") or {}, record.get("check") or {}
    seconds, sizes = record.get("seconds") or {}, record.get("bytes") or {}
    verify_s = [seconds[k] for k in ("verify_fp", "verify") if k in seconds]
    return {
        "name": record.get("name"), "status": record.get("status"), "this_run": this_run,
        "step": record.get("step"), "method": record.get("method"), "scheme": record.get("scheme"),
        "scan": scan.get("verdict") or ("error" if scan.get("error") else "skipped" if scan else None),
        "scan_target": scan.get("target"), "check": _verdict(check.get("passed")) if check else None,
        "gate": _verdict((record.get("gate") or {}).get("passed")) if record.get("gate") else None,
        "fp_cda": fp.get("clean_accuracy"), "fp_asr": fp.get("attack_success_rate"),
        "cda": out.get("clean_accuracy"), "asr": out.get("attack_success_rate"),
        "agreement": check.get("agreement"), "fp_bytes": sizes.get("fp"), "out_bytes": sizes.get("output"),
        "seconds": seconds.get("total"), "quantize_s": seconds.get("quantize"),
        "verify_s": round(sum(verify_s), 3) if verify_s else None, "threads": record.get("threads"),
        "device": record.get("device"),
        "error": f"{record.get('failed_step')}: {record['error']}" if record.get("error") else None,
    }


def _csv_cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, str):
        value = one_line(value)
        return "'" + value if value.startswith(_FORMULA_START) else value
    return value


def csv_text(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV (empty cells for figures that do not exist)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _csv_cell(r[k]) for k in COLUMNS})
    return buffer.getvalue()


def _size(value: object) -> str:
    return "-" if not isinstance(value, int) else f"{value / 1e6:.2f} MB" if value >= 1e5 else f"{value} B"


def _shown(r: dict[str, Any]) -> list[str]:
    """The row as the HTML index and the text table show it."""
    def s(value: object) -> str:
        return "-" if value is None else str(value)

    return [s(r["name"]), s(r["status"]), s(r["this_run"]), s(r["step"]), s(r["scheme"]),
            s(r["scan"]) + (f" ({r['scan_target']})" if r["scan_target"] is not None else ""),
            s(r["check"]), s(r["gate"]), pct(r["fp_cda"]), pct(r["fp_asr"]), pct(r["cda"]), pct(r["asr"]),
            pct(r["agreement"]), _size(r["fp_bytes"]), _size(r["out_bytes"]),
            "-" if r["seconds"] is None else f"{r['seconds']:.1f}s"]


SHOWN = ("model", "status", "this run", "step", "scheme", "scan", "check", "gate", "FP CDA", "FP ASR",
         "CDA", "ASR", "agreement", "FP size", "size", "time")


def text_table(run: BatchRun) -> str:
    """The run's table for the terminal, errors below it."""
    lines = [table(SHOWN, [_shown(r) for r in run.rows])]
    lines += [f"{r['name']}: {r['error']}" for r in run.rows if r["error"]]
    return "\n".join(lines)


def html_index(run: BatchRun) -> str:
    """A self-contained HTML page: the table, each model linked to its files."""
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in SHOWN)
    body = []
    for r in run.rows:
        cells = _shown(r)
        name = str(r["name"])
        links = " ".join(f'<a href="{e(name)}/{e(f)}">{e(label)}</a>' for f, label in
                         ((RESULT_FILE, "result"), ("verify.json", "verify"), ("summary.json", "summary"),
                          (LOG_FILE, "log"), (OUTPUT_FILE, "model")))
        error = f'<tr class="error"><td colspan="{len(SHOWN)}">{e(one_line(r["error"]))}</td></tr>' \
            if r["error"] else ""
        body.append(f"<tr><td>{e(cells[0])}<br><small>{links}</small></td>"
                    + "".join(f"<td>{e(c)}</td>" for c in cells[1:]) + f"</tr>{error}")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>efrap batch</title><style>"
        "body{font-family:sans-serif}table{border-collapse:collapse}td,th{padding:2px 8px;"
        "border-bottom:1px solid #ccc;text-align:left}tr.error td{color:#a00}</style></head><body>\n"
        f"<h1>efrap batch: {e(run.manifest)}</h1>\n<p>{len(run.records)} models; this run computed "
        f"{len(run.computed)} and reused {len(run.skipped)} stored results ({e(run.runner)}, "
        f"{run.seconds:.1f}s). CDA: clean accuracy on the test split; ASR: attack success on test "
        "images outside the trigger's target; agreement: top-1 agreement with the FP model on held-out "
        "training images. Figures from onnxruntime.</p>\n"
        f"<table><tr>{head}</tr>\n" + "\n".join(body) + "\n</table></body></html>\n")


def summary_line(record: dict[str, Any]) -> str:
    """One line about a finished model for the batch log."""
    if record.get("status") != "done":
        return f"error {record['name']} ({record.get('failed_step')}): {record.get('error')}"
    out, fp, check = record.get("output") or {}, record.get("fp") or {}, record.get("check") or {}
    return (f"done {record['name']} in {record['seconds'].get('total', 0):.1f}s: CDA "
            f"{pct(out.get('clean_accuracy'))} (FP {pct(fp.get('clean_accuracy'))}), ASR "
            f"{pct(out.get('attack_success_rate'))} (FP {pct(fp.get('attack_success_rate'))}), agreement "
            f"{pct(check.get('agreement'))}"
            + ("" if record.get("passed") else ", check or gate FAILED"))


def finish(store: Store, manifest: Manifest, runner: str, computed: list[str], skipped: list[str],
           started: float) -> BatchRun:
    """Collect every model's stored result and write results.csv, results.json and index.html."""
    records, rows = [], []
    for job in manifest.jobs:
        record = store.result(job.name) or {
            "name": job.name, "status": "error", "step": job.step, "method": job.options.method,
            "scheme": job.scheme_spec, "error": "no result was stored for this model"}
        records.append(record)
        rows.append(row(record, "computed" if job.name in computed else "skipped"))
    run = BatchRun(manifest=manifest.source, out=str(store.root), runner=runner, records=tuple(records),
                   computed=tuple(computed), skipped=tuple(skipped),
                   seconds=round(time.perf_counter() - started, 3), rows=tuple(rows))
    csv_name, json_name, html_name = SUMMARY_FILES
    write_text(store.root / csv_name, csv_text(rows))
    write_json({"manifest": run.manifest, "out": run.out, "runner": runner, "seconds": run.seconds,
                "computed": list(computed), "skipped": list(skipped), "columns": list(COLUMNS),
                "rows": rows, "models": records}, store.root / json_name)
    write_text(store.root / html_name, html_index(run))
    store.log(f"batch {manifest.source}: {len(computed)} computed, {len(skipped)} skipped, "
              f"{sum(r.get('status') != 'done' for r in records)} failed, in {run.seconds:.1f}s; "
              f"tables in {store.root}")
    return run
