"""The gate's reports: JSON (machines), Markdown (CI logs, also printed) and one HTML file.

The HTML report is self-contained: its pictures are base64 PNG inside the file and it
loads nothing. Every text that comes from outside (paths, node names, the scan's
reasons) is escaped. Every figure names what it was measured on: the model's sha256,
the data, the onnxruntime optimization level and provider.
"""

from __future__ import annotations

import base64
import html
from dataclasses import asdict
from typing import Any

import numpy as np

from pipeline.base.errors import one_line
from pipeline.base.safe_io import write_json, write_text
from pipeline.gate import plots
from pipeline.gate.run import Check, GateRun, output_paths, scan_measured_on
from pipeline.scan.report import Figures, ScanReport
from validators.report import pct
from validators.verify import VerifyReport

#: How the reports write a figure that was not measured.
NA = "n/a"


def _value(check: Check) -> str:
    if check.value is None:
        return "not measurable"
    return check.value if isinstance(check.value, str) else pct(check.value, NA)


def _on(m: dict[str, Any]) -> str:
    """One line naming what a figure was measured on."""
    images = f", {m['images']} images" if m.get("images") is not None else ""
    return (f"model sha256 {m.get('sha256')}, data {m.get('data')} ({m.get('split')}{images}), "
            f"onnxruntime {m.get('provider')} at opt level {m.get('opt_level')}")


def _verify_on(r: VerifyReport) -> dict[str, Any]:
    return {"model": r.model, "sha256": r.model_sha256, "data": r.data, "split": r.split, "images": r.images,
            "opt_level": r.opt_level, "provider": r.provider}


def _scan_on(run: GateRun) -> dict[str, Any]:
    return scan_measured_on(run.config, run.model_sha256, run.scan)


def _size(smallest: tuple[float, bool] | None) -> str:
    return pct(None if smallest is None else smallest[0])


def _index(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _threshold(scan: ScanReport) -> float:
    """The anomaly index a class must reach (the scan's rule)."""
    return float(scan.rule.threshold)


def _inconclusive(scan: ScanReport) -> list[str]:
    """What an inconclusive scan ran, and what its partial evidence says."""
    cov = scan.coverage
    counts = cov.counts(scan.searches)
    ran = (f"{counts['done']} of {counts['planned']} planned searches ran to their end, "
           f"{counts['cut_short']} were cut short and {counts['not_run']} never started"
           if cov.shortlisted else "no search ran")
    lines = [f"The scan is inconclusive: {ran}; figures measured: {'yes' if cov.figures else 'no'}. "
             "An inconclusive scan fails the gate."]
    partial = scan.verdict.partial
    if partial is not None:
        target = f" class {partial.target}" if partial.target is not None else ""
        lines.append(f"What the searches that ran say (evidence, not a verdict): {partial.verdict}{target}.")
    return lines


def scan_evidence(scan: ScanReport) -> tuple[list[list[str]], list[str]]:
    """The scan's evidence per class, for the reports.

    Returns:
        One row per class that was to be searched: class, status (searched, cut short,
        not searched), smallest differential and FP trigger sizes, the two anomaly
        indices, and for a class whose index reaches the threshold without being the
        finding, why it is not one (the scan's `not_findings`); and lines saying what was
        not searched and why the verdict is inconclusive, when it is.
    """
    v = scan.verdict
    states, notes = scan.class_states(), scan.not_findings()
    rows, lines = [], []
    skipped = []
    for c, status in states.items():
        if status == "not shortlisted":
            skipped.append(str(c))
            continue
        why = [f"{name}: {notes[name][c]}" for name in ("differential", "fp") if c in notes[name]]
        if v.target is not None and c == v.target:
            why.insert(0, f"the finding ({v.verdict})")
        sizes = [_size(scan.smallest_trigger(c, mode)) for mode in ("diff", "fp")]
        rows.append([str(c), status, *sizes, _index(v.differential.anomaly_of(c)), _index(v.fp.anomaly_of(c)),
                     "; ".join(why)])
    if skipped:
        lines.append("Not shortlisted (more classes than the scan's max_targets): classes "
                     f"{', '.join(skipped)}.")
    if v.verdict == "inconclusive":
        lines += _inconclusive(scan)
    return rows, lines


#: Columns of the scan's evidence table.
EVIDENCE_COLUMNS = ("class", "status", "differential trigger", "FP trigger", "differential anomaly",
                    "FP anomaly", "not a finding because")


def _asr(figures: Figures) -> list[tuple[str, float | None]]:
    """The recovered trigger's attack success per model, as the scan reports it."""
    return list(figures.reported_asr().items())


def to_json(run: GateRun) -> dict[str, Any]:
    """The JSON report."""
    c = run.config
    vd, vf = run.verify_defended, run.verify_fp
    return {
        "passed": run.passed, "exit_code": 0 if run.passed else 1,
        "config": {"file": str(c.source), "model": str(c.model), "data": c.data, "scheme": c.scheme,
                   "output": str(c.output), "preprocess": c.preprocess, "scan": asdict(c.scan),
                   "defend": asdict(c.defend), "verify": asdict(c.verify),
                   "thresholds": c.thresholds.to_json()},
        "model": {"path": str(c.model), "sha256": run.model_sha256},
        "checks": [asdict(ch) for ch in run.checks],
        "scan": {"verdict": run.scan.verdict.verdict, "target": run.scan.verdict.target,
                 "confidence": run.scan.confidence, "reason": run.scan.verdict.reason,
                 "measured_on": _scan_on(run), "report": run.scan_json()},
        "defend": {"method": c.defend.method, "defended": {"path": str(run.defended_path),
                                                          "sha256": run.defended_sha256},
                   "guard": None if run.guard is None else {
                       **run.guard.to_json(),
                       "measured_on": {"model": str(run.defended_path), "sha256": run.defended_sha256,
                                       "data": c.data, "split": "train, held out", "images": run.guard.images,
                                       "opt_level": run.guard.opt_level, "provider": run.guard.provider}},
                   "summary": run.defend.to_json()},
        "verify": {
            "defended": {"clean_accuracy": vd.clean_accuracy, "trigger_asr": vd.attack_success_rate,
                         "measured_on": _verify_on(vd), "report": vd.to_json()},
            "fp": {"clean_accuracy": vf.clean_accuracy, "trigger_asr": vf.attack_success_rate,
                   "measured_on": _verify_on(vf), "report": vf.to_json()},
            "per_class": {"classes": list(run.per_class.classes), "fp": list(run.per_class.fp),
                          "defended": list(run.per_class.defended), "images": list(run.per_class.images),
                          "measured_on": {"fp": _verify_on(vf), "defended": _verify_on(vd)}},
        },
        "seconds": run.seconds, "versions": run.versions,
    }


def _md_escape(text: str) -> str:
    return one_line(str(text)).replace("|", "\\|")


def to_markdown(run: GateRun) -> str:
    """The Markdown summary for CI logs."""
    c = run.config
    vd, vf = run.verify_defended, run.verify_fp
    lines = [f"# efrap gate: {'PASSED' if run.passed else 'FAILED'}", "",
             f"Model `{_md_escape(str(c.model))}` (sha256 `{run.model_sha256}`), scheme "
             f"`{_md_escape(c.scheme)}`, data `{_md_escape(c.data)}`, config "
             f"`{_md_escape(str(c.source))}`.", "",
             "| check | value | limit | result | measured on |", "|---|---|---|---|---|"]
    for ch in run.checks:
        result = "pass" if ch.passed else "**FAIL**"
        why = f" ({_md_escape(ch.why)})" if ch.why else ""
        lines.append(f"| {_md_escape(ch.name)} | {_md_escape(_value(ch))} | {_md_escape(ch.limit)} | "
                     f"{result}{why} | {_md_escape(_on(ch.measured_on))} |")
    s, v = run.scan, run.scan.verdict
    target = "no target" if v.target is None else f"target {v.target}"
    lines += ["", "## 1. Scan", "",
              f"Verdict **{_md_escape(v.verdict)}**, {target}, confidence "
              f"{pct(s.confidence, NA)}: {_md_escape(v.reason)}."]
    rows, notes = scan_evidence(s)
    lines += [""] + [_md_escape(n) for n in notes]
    if rows:
        lines += ["", f"Per class (anomaly threshold {_threshold(s):g}; sizes are shares of the image):",
                  "",
                  "| " + " | ".join(EVIDENCE_COLUMNS) + " |", "|" + "---|" * len(EVIDENCE_COLUMNS)]
        lines += ["| " + " | ".join(_md_escape(v) for v in row) + " |" for row in rows]
    lines.append("")
    fig = s.trigger_figures
    if fig is not None:
        asr = ", ".join(f"{k} {pct(x, NA)}" for k, x in _asr(fig))
        lines.append(f"Recovered trigger's attack success on {fig.non_target_images} held-out images: "
                     f"{asr} "
                     f"(measured on {_md_escape(_on(_scan_on(run)))}).")
    lines += ["", f"## 2. Defense ({_md_escape(c.defend.method)})", "",
              f"Defended model `{_md_escape(str(run.defended_path))}` (sha256 `{run.defended_sha256}`)."]
    if run.guard is not None:
        g = run.guard
        lines.append(f"Agreement with FP {pct(g.agreement, NA)} on {g.images} held-out training images "
                     f"(onnxruntime {g.provider} at opt level {g.opt_level}; FP sha256 {run.model_sha256}).")
    lines += ["", "## 3. Verification (test split, onnxruntime)", "",
              "| model | sha256 | clean accuracy | recovered trigger ASR | data | images | opt level "
              "| provider |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in (("FP", vf), ("defended", vd)):
        lines.append(f"| {name} | `{r.model_sha256}` | {pct(r.clean_accuracy, NA)} | "
                     f"{pct(r.attack_success_rate, NA)} | "
                     f"{_md_escape(r.data)} | {r.images} | {r.opt_level} | {r.provider} |")
    paths = output_paths(c)
    lines += ["", f"Seconds: scan {run.seconds['scan']}, defense {run.seconds['defend']}, verification "
              f"{run.seconds['verify']}. Reports: {paths['json']}, {paths['html']}.", ""]
    return "\n".join(lines)


def _img(png: bytes, alt: str) -> str:
    return (f'<img alt="{html.escape(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode("ascii")}">')


def _scan_plot(run: GateRun) -> bytes | None:
    s = run.scan
    if not s.classes:
        return None
    classes = list(range(s.classes))
    sizes = {mode: [None if (t := s.smallest_trigger(k, mode)) is None else t[0] for k in classes]
             for mode in ("diff", "fp")}
    states = s.class_states()
    return plots.per_class_scan(
        classes, sizes["diff"], sizes["fp"], [s.verdict.differential.anomaly_of(k) for k in classes],
        _threshold(s), s.verdict.target, [states[k] for k in classes])


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1100px}
h1 .badge{padding:2px 12px;border-radius:6px;color:#fff;font-size:0.8em}
.pass{background:#27ae60}.fail{background:#c0392b}
table{border-collapse:collapse;margin:8px 0 16px 0;font-size:14px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}.small{font-size:12px;color:#555}code{font-size:12px;word-break:break-all}
img{max-width:100%;border:1px solid #eee;margin:6px 0}
"""


def to_html(run: GateRun) -> str:
    """The self-contained HTML report."""
    c = run.config
    e = html.escape
    vd, vf = run.verify_defended, run.verify_fp
    status = "PASSED" if run.passed else "FAILED"
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>efrap gate: {status}</title>",
           f"<style>{_CSS}</style></head><body>",
           f"<h1>efrap gate <span class='badge {'pass' if run.passed else 'fail'}'>{status}</span></h1>",
           f"<p>Model <code>{e(str(c.model))}</code><br>sha256 <code>{run.model_sha256}</code><br>scheme "
           f"<code>{e(c.scheme)}</code>, data <code>{e(c.data)}</code>, config "
           f"<code>{e(str(c.source))}</code></p>",
           "<h2>Checks</h2><table><tr><th>check</th><th>value</th><th>limit</th><th>result</th>"
           "<th>measured on</th></tr>"]
    for ch in run.checks:
        result = "pass" if ch.passed else f"<b>FAIL</b>{'<br>' + e(ch.why) if ch.why else ''}"
        out.append(f"<tr><td>{e(ch.name)}</td><td>{e(_value(ch))}</td><td>{e(ch.limit)}</td><td>{result}</td>"
                   f"<td class='small'>{e(_on(ch.measured_on))}</td></tr>")
    out.append("</table>")
    s, v = run.scan, run.scan.verdict
    target = "none" if v.target is None else str(v.target)
    out += [f"<h2>1. Scan: {e(v.verdict)}</h2>",
            f"<p>Target {e(target)}, confidence {pct(s.confidence, NA)}: {e(v.reason)}.</p>",
            f"<p class='small'>Measured on {e(_on(_scan_on(run)))}; {s.reported_seconds} s.</p>"]
    fig = s.trigger_figures
    if fig is not None:
        out.append("<table><tr><th>recovered trigger on</th><th>attack success (held-out, FP prediction "
                   "not the target)</th></tr>")
        for name, value in _asr(fig):
            out.append(f"<tr><td>{e(name)}</td><td>{pct(value, NA)}</td></tr>")
        out.append(f"</table><p class='small'>{fig.non_target_images} of {fig.images} held-out "
                   "training images.</p>")
    if run.trigger is not None and run.example is not None:
        ex = run.example
        mask = np.asarray(run.trigger.mask) * run.trigger.blend
        captions = ("pattern (grey: not stamped)", "mask (blend included)",
                    f"test image, label {ex.label}: FP says {ex.fp_clean}",
                    f"triggered: FP {ex.fp_triggered}, defended {ex.defended_triggered}")
        out.append(_img(plots.trigger_images(run.trigger.pattern, mask, ex.clean, ex.triggered, captions),
                        "recovered trigger"))
        out.append(f"<p class='small'>Predictions from onnxruntime ({e(vd.provider)}, opt level "
                   f"{e(vd.opt_level)}); FP sha256 {run.model_sha256}, defended sha256 "
                   f"{run.defended_sha256}; "
                   f"target class {run.trigger.target}.</p>")
    scan_png = _scan_plot(run)
    if scan_png is not None:
        out.append(_img(scan_png, "scan per class"))
        out.append(f"<p class='small'>Trigger sizes from the scan's searches on training images "
                   f"({e(s.measured_on().data)}); the anomaly index is Neural Cleanse's, over the "
                   "classes. FP model sha256 " + run.model_sha256 + ".</p>")
    rows, notes = scan_evidence(s)
    out += [f"<p><b>{e(n)}</b></p>" if n.startswith("The scan is inconclusive") else f"<p>{e(n)}</p>"
            for n in notes]
    if rows:
        head = "".join(f"<th>{e(h)}</th>" for h in EVIDENCE_COLUMNS)
        out.append(f"<p class='small'>Per class; anomaly threshold {_threshold(s):g}; sizes are shares of "
                   f"the image.</p><table><tr>{head}</tr>")
        out += ["<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>" for row in rows]
        out.append("</table>")
    out.append(f"<h2>2. Defense: {e(c.defend.method)}</h2>")
    out.append(f"<p>Defended model <code>{e(str(run.defended_path))}</code><br>sha256 "
               f"<code>{run.defended_sha256}</code></p>")
    if run.guard is not None:
        g = run.guard
        out.append(f"<p>Agreement with FP {pct(g.agreement, NA)} on {g.images} held-out training images "
                   f"({e(c.data)}); onnxruntime {e(g.provider)} at opt level {e(g.opt_level)}.</p>")
    out.append("<h2>3. Verification: test split, onnxruntime</h2><table><tr><th>model</th><th>sha256</th>"
               "<th>clean accuracy</th><th>recovered trigger ASR</th><th>data</th><th>images</th>"
               "<th>opt level</th><th>provider</th></tr>")
    for name, r in (("FP", vf), ("defended", vd)):
        out.append(f"<tr><td>{name}</td><td><code>{r.model_sha256}</code></td>"
                   f"<td>{pct(r.clean_accuracy, NA)}</td><td>{pct(r.attack_success_rate, NA)}</td>"
                   f"<td>{e(r.data)}</td><td>{r.images}</td>"
                   f"<td>{e(r.opt_level)}</td><td>{e(r.provider)}</td></tr>")
    out.append("</table>")
    pc = run.per_class
    out.append(_img(plots.per_class_accuracy(pc.classes, pc.fp, pc.defended, f"defended ({c.defend.method})"),
                    "per-class accuracy"))
    out.append(f"<p class='small'>Test split of {e(vd.data)}, {vd.images} images; FP sha256 "
               f"{vf.model_sha256}, "
               f"defended sha256 {vd.model_sha256}; onnxruntime {e(vd.provider)} at opt level "
               f"{e(vd.opt_level)}.</p>")
    seconds = ", ".join(f"{k} {v:g} s" for k, v in run.seconds.items())
    versions = ", ".join(f"{k} {v}" for k, v in run.versions.items())
    out.append(f"<p class='small'>Time: {e(seconds)}. Versions: {e(versions)}.</p>")
    out.append("</body></html>\n")
    return "".join(out)


def write_reports(run: GateRun) -> str:
    """Write report.json, summary.md and report.html; returns the Markdown."""
    paths = output_paths(run.config)
    markdown = to_markdown(run)
    write_json(to_json(run), paths["json"])
    write_text(paths["markdown"], markdown)
    write_text(paths["html"], to_html(run))
    return markdown

