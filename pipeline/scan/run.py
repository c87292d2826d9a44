"""`scan_model`: decide, with no trigger and only clean unlabelled data, whether a model carries
a backdoor that the deployment quantization wakes.

1. The nearest deployment is built exactly as `efrap quantize --method nearest` builds it
   (same scheme, calibration images and seed), and both it and the FP model become
   differentiable functions of [0, 1] images (pipeline.scan.sides).
2. Candidate targets: every class, or, with more classes than `max_targets`, a
   shortlist ranked by the clean-data drift of the nearest model and a short probe
   of the differential objective per class (K-Arm's idea of spending the search on
   the promising classes: Shen et al., "Backdoor Scanning for Deep Neural Networks
   through K-Arm Optimization", ICML 2021).
3. Per candidate: the differential searches (each trigger family) and Neural Cleanse
   on the FP model (pipeline.scan.search), within the time budget.
4. The verdict (pipeline.scan.verdict) from the per-class trigger sizes.
5. The recovered trigger's attack success in onnxruntime, on held-out training images
   that neither calibration nor the search used: FP, nearest, and with `defended`
   the defended model, which is then searched afresh as the quantized side.
"""

from __future__ import annotations

import math
import time

import torch

from pipeline.base.provenance import versions
from pipeline.base.safe_io import file_sha256
from pipeline.base.seeds import derive
from pipeline.scan.decision import covered_verdict, decide_scan
from pipeline.scan.defended import scan_defended
from pipeline.scan.figures import recovered_figures
from pipeline.scan.inputs import read_inputs
from pipeline.scan.options import ScanOptions
from pipeline.scan.report import Coverage, ScanReport
from pipeline.scan.stages import run_stages
from pipeline.scan.state import Clock, ScanState

__all__ = ["ScanOptions", "scan_model"]


def scan_model(model_path: str, options: ScanOptions, defended: str | None = None) -> ScanReport:
    """Scan an FP model for a backdoor that the deployment quantization wakes.

    The budget bounds the whole scan: every stage starts only while it lasts, each search
    stops at its share, and the recovered trigger's figures run only when they fit
    (their time is measured on the clean held-out images first). A scan that the budget
    stopped anywhere is "inconclusive", with what was and was not searched.

    Args:
        model_path: The FP ONNX model.
        options: Scheme, data, seed, budget and search settings.
        defended: A defended QDQ model of the same FP model (`efrap defend`) to scan too.

    Raises:
        EfrapError: unreadable model or data, data the model cannot take, a graph the
            PyTorch simulation does not cover, a fixed batch size.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    end = start + options.budget if options.budget is not None else math.inf
    torch.manual_seed(derive(options.seed, "scan-torch"))
    st = read_inputs(model_path, options, defended, Clock(end=end, search_end=end))
    run_stages(st)
    decision = decide_scan(st)
    figures = recovered_figures(st, decision.trigger)
    coverage = Coverage(planned=st.planned, defended_planned=st.defended_planned,
                        shortlisted=st.targets is not None, figures=figures is not None, stopped=st.stopped)
    verdict = covered_verdict(st, decision.verdict, coverage)
    defended_part, defended_seconds = scan_defended(st, verdict, decision.fp_test, figures)
    cut = verdict.verdict == "inconclusive" or (defended_part is not None
                                               and defended_part.verdict.verdict == "inconclusive")
    drifts = () if st.drifts is None else tuple(float(d) for d in st.drifts)
    return ScanReport(
        model=model_path, model_sha256=file_sha256(model_path), verdict=verdict, trigger=decision.trigger,
        trigger_found=decision.chosen, figures=figures, classes=st.classes, searched=tuple(st.targets or ()),
        drift=drifts, searches=st.searches, parity=st.parity, defended=defended_part,
        settings=options.to_json(), provenance=_provenance(st), cut_short=cut, coverage=coverage,
        seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start,
        defended_seconds=defended_seconds, notes=tuple(st.notes), rule=options.rule)


def _provenance(st: ScanState) -> dict[str, object]:
    """What the scan ran on: data, scheme, seed, image counts, preprocessing, onnxruntime,
    threads and versions (the report's `provenance`)."""
    options = st.options
    provider = st.sessions["fp"].provider if st.sessions else options.provider
    return {
        "data": options.calib, "scheme": options.scheme.to_json(), "seed": options.seed,
        "calibration_images": len(st.raw), "search_images": None if st.data is None else len(st.data.opt_x),
        "evaluation_images": None if st.data is None else len(st.data.eval_x),
        "holdout_images": len(st.raw_hold), "preprocessing": st.pre.to_json(),
        "onnxruntime": {"opt_level": options.opt_level, "provider": provider},
        "threads": torch.get_num_threads(), "versions": versions(),
    }
