"""The stages of a scan before its decision, each started only while the budget lasts:
the nearest deployment and the differentiable sides, the clean held-out figures in
onnxruntime, the shortlist, the searches."""

from __future__ import annotations

import time

from pipeline.base import budget, memory
from pipeline.base.errors import EfrapError
from pipeline.base.progress import log
from pipeline.base.runtime import make_session
from pipeline.prepare import prepare_model
from pipeline.quantize import QuantizeOptions, quantize_model
from pipeline.scan.figures import ort_batch, session_logits
from pipeline.scan.planning import plan_searches, run_searches, shortlist, split_images
from pipeline.scan.search import drift
from pipeline.scan.sides import fp_side, nearest_side, qdq_side
from pipeline.scan.state import FIGURE_FLOOR, ScanState


def build_sides(st: ScanState) -> None:
    """The nearest deployment and the FP and nearest sides (and the defended one)."""
    options = st.options
    log(f"scan: building the nearest {options.scheme.name} deployment of {st.model_path} "
        f"({len(st.raw)} calibration images)")
    st.qdq, result, _ = quantize_model(st.model, st.images,
                                       QuantizeOptions(options.deployment, method="nearest", device="cpu"),
                                       st.model_path, st.pre)
    st.fp = fp_side(prepare_model(st.model, st.model_path), st.pre, st.model_path, options.search.relu_slope)
    st.q = nearest_side(st.fp, result)
    fp_logits, q_logits = st.fp.logits(st.raw), st.q.logits(st.raw)
    if fp_logits.shape[1] < 2:
        raise EfrapError(f"{st.model_path}: the scan needs a classifier with at least 2 classes")
    st.classes = int(fp_logits.shape[1])
    st.data = split_images(st.raw, fp_logits.argmax(1), options)
    st.drifts = drift(fp_logits, q_logits)
    if st.defended_model is not None and st.defended_path is not None:
        st.defended_side = qdq_side("defended", st.defended_model, st.pre, st.defended_path,
                                    options.search.relu_slope)


def measure_clean(st: ScanState) -> None:
    """The clean held-out predictions in onnxruntime and the simulation's parity with them,
    before the searches: they do not depend on the trigger, and their time sets what the
    triggered figures after the searches are given."""
    assert st.qdq is not None and st.fp is not None and st.q is not None
    options = st.options
    # No arena: each pass's buffers go back when it ends, instead of the largest batch's
    # high-water mark staying resident for the rest of the scan.
    st.sessions = {"fp": make_session(st.model, options.opt_level, options.provider, arena=False),
                   "nearest": make_session(st.qdq, options.opt_level, options.provider, arena=False)}
    if st.defended_model is not None:
        st.sessions["defended"] = make_session(st.defended_model, options.opt_level, options.provider,
                                               arena=False)
    t0 = time.perf_counter()
    st.clean = {name: logits.argmax(1) for name, logits in session_logits(st.sessions, st.raw_hold, st.pre,
                                                                      batch=ort_batch(st)).items()}
    st.pass_seconds = time.perf_counter() - t0
    st.parity = {"fp": float((st.fp.logits(st.raw_hold).argmax(1).numpy() != st.clean["fp"]).mean()),
                 "nearest": float((st.q.logits(st.raw_hold).argmax(1).numpy() != st.clean["nearest"]).mean())}


def run_stages(st: ScanState) -> None:
    """The stages before the decision, each started only while the budget lasts
    (`st.stopped` names the stage it ran out before or in)."""
    options, clock = st.options, st.clock
    for stage, step in (("the nearest deployment", build_sides),
                        ("the clean held-out figures", measure_clean)):
        if clock.out():
            st.stopped = stage
            return
        try:
            # A stage of minutes (calibrating, a pass over the images) stops at the deadline.
            with budget.within(clock.end):
                step(st)
            memory.trim()
        except budget.OutOfTime:
            st.stopped = stage
            st.sessions = {}  # the figures need every clean prediction
            return
    if options.budget is not None:
        # The searches end early enough for the triggered figures (one pass, two with a defended model).
        passes = 2 if st.defended_model is not None else 1
        clock.search_end = clock.end - passes * st.figure_seconds() - FIGURE_FLOOR
    if clock.out():
        st.stopped = "the shortlist"
        return
    assert st.fp is not None and st.q is not None and st.data is not None and st.drifts is not None
    st.targets, note = shortlist(st.fp, st.q, st.data, st.drifts, options, clock)
    if st.targets is None:
        st.stopped = "the shortlist"
        return
    if note:
        st.notes.append(note)
    plan_searches(st)
    run_searches(st)
