"""Figures measured in onnxruntime on the held-out images: each session's logits, and a
recovered trigger's attack success and the clean agreement with the FP model."""

from __future__ import annotations

import numpy as np

from pipeline.base import budget
from pipeline.base.preprocess import Preprocess
from pipeline.base.progress import QUICK_PASS, Progress, log
from pipeline.base.runtime import Session
from pipeline.base.trigger import PatternTrigger
from pipeline.scan.images import ImageSet, batch_for
from pipeline.scan.report import Figures
from pipeline.scan.state import ScanState
from validators.metrics import attack_success


def session_logits(sessions: dict[str, Session], raw: ImageSet, pre: Preprocess,
            trigger: PatternTrigger | None = None, batch: int | None = None) -> dict[str, np.ndarray]:
    """Each session's logits on `raw` (stamped with `trigger` first, when given), `batch`
    images at a time (default: `batch_for` their size): only one chunk of model-ready
    inputs exists at a time."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
    kind = "triggered" if trigger is not None else "clean"
    bar = Progress(f"scan: {', '.join(sessions)} in onnxruntime on {kind} held-out images", total=len(raw),
                   min_seconds=QUICK_PASS)
    # onnxruntime's arena grows to the largest batch it ran: a few images at 224 x 224.
    for chunk in raw.chunks(batch or batch_for(tuple(raw.shape[1:]))):
        budget.check()
        inputs = pre.apply(trigger.apply(chunk) if trigger is not None else chunk)
        for name, s in sessions.items():
            parts[name].append(s.run(inputs))
        bar.update(len(chunk))
    bar.close(f"{len(raw):,} images")
    return {name: np.concatenate(p) for name, p in parts.items()}


def ort_batch(st: ScanState) -> int | None:
    """Images per onnxruntime pass: sized by the FP model's activations once its side exists."""
    return None if st.fp is None else st.fp.logits_batch(tuple(st.raw.shape[1:]))


def trigger_figures(trigger: PatternTrigger, raw: ImageSet, pre: Preprocess, sessions: dict[str, Session],
             fp_pred: np.ndarray, clean: dict[str, np.ndarray], batch: int | None = None) -> Figures:
    """The trigger's attack success in onnxruntime on held-out images (`batch` at a time)."""
    logits = session_logits(sessions, raw, pre, trigger, batch)
    asr = {name: attack_success(logits[name], fp_pred, trigger.target).rate for name in sessions}
    agreement = {name: float((pred == fp_pred).mean()) for name, pred in clean.items()}
    return Figures(asr=asr, agreement=agreement, images=len(raw),
                   non_target_images=int((fp_pred != trigger.target).sum()))


def recovered_figures(st: ScanState, trigger: PatternTrigger | None) -> Figures | None:
    """The recovered trigger's figures, when there is one and they fit in the budget (None:
    not measured; `st.stopped` then names them when the budget was the reason)."""
    if trigger is None or not st.sessions:
        return None
    if not st.clock.fits(st.figure_seconds()):
        st.stopped = st.stopped or "the held-out figures"
        return None
    log("scan: measuring in onnxruntime on held-out images")
    return trigger_figures(trigger, st.raw_hold, st.pre, st.sessions, st.clean["fp"], st.clean, ort_batch(st))
