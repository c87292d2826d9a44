"""The scan's decision from its searches: the outlier tests, the verdict, the trigger it
recovers, and the verdict made inconclusive when the budget left searches undone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.base.trigger import PatternTrigger
from pipeline.scan.report import Coverage, recovered_trigger
from pipeline.scan.search import Found
from pipeline.scan.state import ScanState
from pipeline.scan.verdict import TestResult, Verdict, VerdictRule, decide, inconclusive, run_test


@dataclass(frozen=True)
class Decision:
    """The verdict on the FP model's searches and the trigger it rests on.

    Attributes:
        verdict: From the differential and the FP tests.
        fp_test: The FP test (the defended part's verdict uses it too).
        chosen: The search whose trigger is recovered (None: no search ran).
        trigger: That search's trigger.
    """

    verdict: Verdict
    fp_test: TestResult
    chosen: Found | None
    trigger: PatternTrigger | None


def outlier_test(name: str, searches: dict[int, list[Found]], pick: Callable[[Found], bool],
          rule: VerdictRule) -> TestResult:
    """The outlier test over the smallest trigger per class among the searches `pick` selects."""
    classes, sizes, found = [], [], []
    for c, results in sorted(searches.items()):
        chosen = [f for f in results if pick(f)]
        if not chosen:
            continue
        hits = [f for f in chosen if f.found]
        classes.append(c)
        # A found trigger's size, else the smallest lower bound the searches reached.
        sizes.append(min(f.size for f in (hits or chosen)))
        found.append(bool(hits))
    return run_test(name, classes, sizes, found, rule)


def best_found(results: list[Found]) -> Found | None:
    """The smallest found trigger, else the one closest to success."""
    if not results:
        return None
    found = [f for f in results if f.found]
    if found:
        return min(found, key=lambda f: f.size)
    return max(results, key=lambda f: f.success)


def decide_scan(st: ScanState) -> Decision:
    """The verdict on the searches and the trigger recovered for it."""
    searches, rule = st.searches, st.options.rule
    diff_test = outlier_test("differential", searches, lambda f: f.mode == "diff", rule)
    fp_test = outlier_test("fp", searches, lambda f: f.mode == "fp", rule)
    verdict = decide(diff_test, fp_test)
    chosen: Found | None
    if verdict.verdict == "fp-backdoor":
        chosen = best_found([f for f in searches.get(verdict.target, []) if f.mode == "fp"])  # type: ignore[arg-type]
    else:
        cand = diff_test.candidate
        pool = [f for fs in searches.values() for f in fs if f.mode == "diff"]
        chosen = best_found([f for f in pool if f.target == cand]) if cand is not None else best_found(pool)
    trigger = recovered_trigger(chosen) if chosen is not None else None
    return Decision(verdict, fp_test, chosen, trigger)


def covered_verdict(st: ScanState, verdict: Verdict, coverage: Coverage) -> Verdict:
    """`verdict`, or inconclusive when the budget left planned work undone (noted in `st`)."""
    if coverage.complete(st.searches):
        return verdict
    # A search that never ran found nothing: no verdict rests on it.
    verdict = inconclusive(verdict, incomplete(coverage.to_json(st.classes, st.searches), st.options.budget))
    st.notes.append(verdict.reason)
    return verdict


def incomplete(coverage: dict[str, object], budget: float | None) -> str:
    """One sentence: what the budget let the scan do and what not."""
    counts, classes = coverage["searches"], coverage["classes"]
    assert isinstance(counts, dict) and isinstance(classes, dict)
    parts = [f"{counts['done']} of {counts['planned']} planned searches ran to their end"
             if coverage["shortlisted"] else "no search ran (the classes to search were not chosen yet)"]
    if counts["cut_short"]:
        parts.append(f"{counts['cut_short']} were cut short")
    if counts["not_run"]:
        parts.append(f"{counts['not_run']} never started")
    for state in ("cut short", "not searched"):
        if classes[state]:
            parts.append(f"classes {state}: {', '.join(str(c) for c in classes[state])}")
    if not coverage["figures_measured"]:
        parts.append("the recovered trigger was not measured in onnxruntime on the held-out images")
    stopped = f", at {coverage['stopped_at']}" if coverage["stopped_at"] else ""
    limit = (f"the time budget ({budget:g} s) ran out{stopped}" if budget is not None
             else "the scan did not finish")
    return f"{limit}: {'; '.join(parts)}"
