"""The defended part of a scan: the defended model searched afresh as the quantized side,
its own verdict, and its own trigger's figures when the budget allows."""

from __future__ import annotations

import time

from pipeline.base.safe_io import file_sha256
from pipeline.scan.decision import best_found, incomplete, outlier_test
from pipeline.scan.figures import ort_batch, trigger_figures
from pipeline.scan.report import Coverage, DefendedScan, Figures, class_states, recovered_trigger
from pipeline.scan.search import Found
from pipeline.scan.state import ScanState
from pipeline.scan.verdict import TestResult, Verdict, decide, inconclusive


def scan_defended(st: ScanState, verdict: Verdict, fp_test: TestResult,
                  figures: Figures | None) -> tuple[DefendedScan | None, float | None]:
    """The defended part and the seconds it took, its searches included (None, None: no
    defended model).

    Args:
        st: The scan so far (the defended searches ran with the others).
        verdict: The FP model's verdict, coverage applied.
        fp_test: The FP test, which the defended verdict shares.
        figures: The FP model's recovered trigger's figures (None: not measured).
    """
    if st.defended_model is None or st.defended_path is None:
        return None, None
    t_def = time.perf_counter()
    d_test = outlier_test("differential", st.defended_searches, lambda f: True, st.options.rule)
    d_verdict = decide(d_test, fp_test)
    own = _own_trigger(st, d_test)
    d_states = class_states(st.classes, st.defended_planned, st.targets is not None, st.defended_searches)
    d_complete = (verdict.verdict != "inconclusive" and own is not None
                  and all(v in ("searched", "not shortlisted") for v in d_states.values()))
    if not d_complete:
        d_cov = Coverage(planned=st.defended_planned, defended_planned=(),
                         shortlisted=st.targets is not None,
                         figures=own is not None and figures is not None, stopped=st.stopped)
        d_verdict = inconclusive(d_verdict, "defended part: " + incomplete(
            d_cov.to_json(st.classes, st.defended_searches), st.options.budget))
    part = DefendedScan(model=st.defended_path, model_sha256=file_sha256(st.defended_path),
                        recovered=figures, verdict=d_verdict, searches=st.defended_searches,
                        own_trigger=own, states={c: v for c, v in d_states.items() if v != "not shortlisted"})
    seconds = time.perf_counter() - t_def + sum(f.seconds for fs in st.defended_searches.values() for f in fs)
    return part, seconds


def _own_trigger(st: ScanState, d_test: TestResult) -> tuple[Found, Figures] | None:
    """The defended model's own best trigger and its figures, when they fit in the budget."""
    own_found = best_found([f for fs in st.defended_searches.values() for f in fs
                            if d_test.candidate is None or f.target == d_test.candidate])
    if own_found is None or not st.sessions or not st.clock.fits(st.figure_seconds()):
        return None
    return own_found, trigger_figures(recovered_trigger(own_found), st.raw_hold, st.pre, st.sessions,
                                      st.clean["fp"], st.clean, ort_batch(st))
