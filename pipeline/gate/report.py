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
from pipeline.gate.run import Check, GateRun, output_paths
from validators.verify import VerifyReport


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _value(check: Check) -> str:
    if check.value is None:
        return "not measurable"
    return check.value if isinstance(check.value, str) else _pct(check.value)


def _on(m: dict[str, Any]) -> str:
    """One line naming what a figure was measured on."""
    images = f", {m['images']} images" if m.get("images") is not None else ""
    return (f"model sha256 {m.get('sha256')}, data {m.get('data')} ({m.get('split')}{images}), "
            f"onnxruntime {m.get('provider')} at opt level {m.get('opt_level')}")


def _verify_on(r: VerifyReport) -> dict[str, Any]:
    return {"model": r.model, "sha256": r.model_sha256, "data": r.data, "split": r.split, "images": r.images,
            "opt_level": r.opt_level, "provider": r.provider}


def _scan_on(run: GateRun) -> dict[str, Any]:
    s = run.scan
    onnxrt = s.get("onnxruntime") or {}
    return {"model": str(run.config.model), "sha256": run.model_sha256,
            "data": s.get("data", run.config.data),
            "split": "train, held out", "images": s.get("holdout_images"),
            "opt_level": onnxrt.get("opt_level"), "provider": onnxrt.get("provider")}


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _size(value: object) -> str:
    v = _number(value)
    return "-" if v is None else f"{100 * v:.2f}%"


def _index(value: object) -> str:
    v = _number(value)
    return "-" if v is None else f"{v:.2f}"


def _threshold(scan: dict[str, Any]) -> float:
    rule = (scan.get("settings") or {}).get("rule") or {}
    return float(_number(rule.get("threshold")) or 2.0)


def scan_evidence(scan: dict[str, Any]) -> tuple[list[list[str]], list[str]]:
    """The scan's evidence per class, for the reports.

    Returns:
        One row per class that was to be searched: class, status (searched, cut short,
        not searched), smallest differential and FP trigger sizes, the two anomaly
        indices, and for a class whose index reaches the threshold without being the
        finding, why it is not one (the scan's `not_findings`); and lines saying what was
        not searched and why the verdict is inconclusive, when it is.
    """
    per = scan.get("classes") if isinstance(scan.get("classes"), dict) else {}
    tests = scan.get("tests") or {}
    notes = scan.get("not_findings") or {}
    rows, lines = [], []
    skipped = []
    for key in sorted(per, key=int):
        entry = per[key] or {}
        status = str(entry.get("status") or ("searched" if entry.get("searched") else "not searched"))
        if status == "not shortlisted":
            skipped.append(key)
            continue
        why = [f"{name}: {(notes.get(name) or {})[key]}" for name in ("differential", "fp")
               if key in (notes.get(name) or {})]
        diff = ((tests.get("differential") or {}).get("per_class") or {}).get(key) or {}
        fp = ((tests.get("fp") or {}).get("per_class") or {}).get(key) or {}
        if scan.get("target") is not None and int(key) == scan.get("target"):
            why.insert(0, f"the finding ({scan.get('verdict')})")
        rows.append([key, status, _size(entry.get("differential_size")), _size(entry.get("fp_size")),
                     _index(diff.get("anomaly")), _index(fp.get("anomaly")), "; ".join(why)])
    if skipped:
        lines.append("Not shortlisted (more classes than the scan's max_targets): classes "
                     f"{', '.join(skipped)}.")
    if scan.get("verdict") == "inconclusive":
        cov = scan.get("coverage") or {}
        counts = cov.get("searches") or {}
        ran = (f"{counts.get('done', 0)} of {counts.get('planned', 0)} planned searches ran to their end, "
               f"{counts.get('cut_short', 0)} were cut short and {counts.get('not_run', 0)} never started"
               if cov.get("shortlisted") else "no search ran")
        lines.append(f"The scan is inconclusive: {ran}; figures measured: "
                     f"{'yes' if cov.get('figures_measured') else 'no'}. "
                     "An inconclusive scan fails the gate.")
        partial = scan.get("partial")
        if isinstance(partial, dict):
            target = f" class {partial.get('target')}" if partial.get("target") is not None else ""
            lines.append(f"What the searches that ran say (evidence, not a verdict): {partial.get('verdict')}"
                         f"{target}.")
    return rows, lines


#: Columns of the scan's evidence table.
EVIDENCE_COLUMNS = ("class", "status", "differential trigger", "FP trigger", "differential anomaly",
                    "FP anomaly", "not a finding because")


def _trigger_figures(run: GateRun) -> dict[str, Any] | None:
    trig = run.scan.get("trigger")
    return None if not isinstance(trig, dict) else trig.get("figures")


def to_json(run: GateRun) -> dict[str, Any]:
    """The JSON report."""
    c = run.config
    vd, vf = run.verify_defended, run.verify_fp
    return {
        "passed": run.passed, "exit_code": 0 if run.passed else 1,
        "config": {"file": str(c.source), "model": str(c.model), "data": c.data, "scheme": c.scheme,
                   "output": str(c.output), "preprocess": c.preprocess, "scan": asdict(c.scan),
                   "defend": asdict(c.defend), "verify": asdict(c.verify),
                   "thresholds": asdict(c.thresholds)},
        "model": {"path": str(c.model), "sha256": run.model_sha256},
        "checks": [asdict(ch) for ch in run.checks],
        "scan": {"verdict": run.scan.get("verdict"), "target": run.scan.get("target"),
                 "confidence": run.scan.get("confidence"), "reason": run.scan.get("reason"),
                 "measured_on": _scan_on(run), "report": run.scan},
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
    s = run.scan
    lines += ["", "## 1. Scan", "",
              f"Verdict **{_md_escape(str(s.get('verdict')))}**, target {s.get('target')}, confidence "
              f"{_pct(s.get('confidence'))}: {_md_escape(str(s.get('reason', '')))}."]
    rows, notes = scan_evidence(s)
    lines += [""] + [_md_escape(n) for n in notes]
    if rows:
        lines += ["", f"Per class (anomaly threshold {_threshold(s):g}; sizes are shares of the image):", "",
                  "| " + " | ".join(EVIDENCE_COLUMNS) + " |", "|" + "---|" * len(EVIDENCE_COLUMNS)]
        lines += ["| " + " | ".join(_md_escape(v) for v in row) + " |" for row in rows]
    lines.append("")
    fig = _trigger_figures(run)
    if fig:
        asr = ", ".join(f"{k} {_pct(v)}" for k, v in (fig.get("asr") or {}).items())
        lines.append(f"Recovered trigger's attack success on {fig.get('non_target_images')} held-out images: "
                     f"{asr} "
                     f"(measured on {_md_escape(_on(_scan_on(run)))}).")
    lines += ["", f"## 2. Defense ({_md_escape(c.defend.method)})", "",
              f"Defended model `{_md_escape(str(run.defended_path))}` (sha256 `{run.defended_sha256}`)."]
    if run.guard is not None:
        g = run.guard
        lines.append(f"Agreement with FP {_pct(g.agreement)} on {g.images} held-out training images "
                     f"(onnxruntime {g.provider} at opt level {g.opt_level}; FP sha256 {run.model_sha256}).")
    lines += ["", "## 3. Verification (test split, onnxruntime)", "",
              "| model | sha256 | clean accuracy | recovered trigger ASR | data | images | opt level "
              "| provider |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in (("FP", vf), ("defended", vd)):
        lines.append(f"| {name} | `{r.model_sha256}` | {_pct(r.clean_accuracy)} | "
                     f"{_pct(r.attack_success_rate)} | "
                     f"{_md_escape(r.data)} | {r.images} | {r.opt_level} | {r.provider} |")
    paths = output_paths(c)
    lines += ["", f"Seconds: scan {run.seconds['scan']}, defense {run.seconds['defend']}, verification "
              f"{run.seconds['verify']}. Reports: {paths['json']}, {paths['html']}.", ""]
    return "\n".join(lines)


def _img(png: bytes, alt: str) -> str:
    return (f'<img alt="{html.escape(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode("ascii")}">')


def _scan_plot(run: GateRun) -> bytes | None:
    per = run.scan.get("classes")
    if not isinstance(per, dict) or not per:
        return None
    classes = sorted(int(k) for k in per)
    tests = run.scan.get("tests") or {}
    anomaly_table = ((tests.get("differential") or {}).get("per_class")) or {}
    settings = run.scan.get("settings") or {}
    threshold = float(((settings.get("rule") or {}).get("threshold")) or 2.0)
    return plots.per_class_scan(
        classes, [per[str(k)].get("differential_size") for k in classes],
        [per[str(k)].get("fp_size") for k in classes],
        [(anomaly_table.get(str(k)) or {}).get("anomaly") for k in classes], threshold,
        run.scan.get("target"), [str(per[str(k)].get("status") or "searched") for k in classes])


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
    s = run.scan
    out += [f"<h2>1. Scan: {e(str(s.get('verdict')))}</h2>",
            f"<p>Target {e(str(s.get('target')))}, confidence {_pct(s.get('confidence'))}: "
            f"{e(str(s.get('reason', '')))}.</p>",
            f"<p class='small'>Measured on {e(_on(_scan_on(run)))}; {s.get('seconds')} s.</p>"]
    fig = _trigger_figures(run)
    if fig:
        out.append("<table><tr><th>recovered trigger on</th><th>attack success (held-out, FP prediction "
                   "not the target)</th></tr>")
        for name, value in (fig.get("asr") or {}).items():
            out.append(f"<tr><td>{e(str(name))}</td><td>{_pct(value)}</td></tr>")
        out.append(f"</table><p class='small'>{fig.get('non_target_images')} of {fig.get('images')} held-out "
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
                   f"({e(str(s.get('data', c.data)))}); the anomaly index is Neural Cleanse's, over the "
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
        out.append(f"<p>Agreement with FP {_pct(g.agreement)} on {g.images} held-out training images "
                   f"({e(c.data)}); onnxruntime {e(g.provider)} at opt level {e(g.opt_level)}.</p>")
    out.append("<h2>3. Verification: test split, onnxruntime</h2><table><tr><th>model</th><th>sha256</th>"
               "<th>clean accuracy</th><th>recovered trigger ASR</th><th>data</th><th>images</th>"
               "<th>opt level</th><th>provider</th></tr>")
    for name, r in (("FP", vf), ("defended", vd)):
        out.append(f"<tr><td>{name}</td><td><code>{r.model_sha256}</code></td><td>{_pct(r.clean_accuracy)}</td>"
                   f"<td>{_pct(r.attack_success_rate)}</td><td>{e(r.data)}</td><td>{r.images}</td>"
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

