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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch

from pipeline.base import budget, checks, limits, memory
from pipeline.base.deployment import Deployment
from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import check_logits, fixed_batch, image_input, load_model
from pipeline.base.preprocess import PreparedImages, Preprocess
from pipeline.base.progress import QUICK_PASS, Progress, log
from pipeline.base.provenance import versions
from pipeline.base.runtime import Session, make_session
from pipeline.base.safe_io import file_sha256
from pipeline.base.scheme import Scheme
from pipeline.base.seeds import derive
from pipeline.base.trigger import PatternTrigger
from pipeline.prepare import prepare_model
from pipeline.quantize import QuantizeOptions, calibration_images, holdout_images, quantize_model
from pipeline.scan.images import ImageSet, batch_for
from pipeline.scan.report import Coverage, DefendedScan, Figures, ScanReport, class_states, recovered_trigger
from pipeline.scan.search import FAMILIES, Found, SearchConfig, drift, search_class
from pipeline.scan.sides import Side, batches, fp_side, nearest_side, qdq_side
from pipeline.scan.verdict import TestResult, VerdictRule, decide, inconclusive, run_test
from validators.metrics import attack_success

#: The searches leave time for the recovered trigger's onnxruntime figures: FIGURE_MARGIN times
#: what the same models took on the clean held-out images (measured before the searches), per
#: triggered pass, plus FIGURE_FLOOR seconds (a machine shared with other jobs runs slower).
FIGURE_MARGIN = 2.0
FIGURE_FLOOR = 0.5


@dataclass(frozen=True)
class ScanOptions:
    """Settings of one scan, checked when built.

    Attributes:
        deployment: The settings every step shares, checked there: the deployment's scheme
            (the nearest model is built with it; required), the clean unlabelled images'
            data set (training split: calibration of the nearest model, the searches, and
            the held-out figures), calibration images (as `efrap quantize`; the default
            1,024 and seed reproduce its nearest model exactly; a quarter of them, at most
            `eval_images`, check the triggers, the rest drive the search), the scan's one
            seed (calibration images, search batches and initial patterns), the
            onnxruntime provider and optimization level of the figures, preprocessing.
        budget: Seconds the whole scan may take, held-out figures included (searches split
            what is left; a scan the budget stops is "inconclusive"; None: no limit).
        holdout: Held-out training images for the onnxruntime figures.
        search: Settings of each class's search.
        rule: Thresholds of the verdict.
        families: Trigger families of the differential search ("patch", "blend").
        fp_families: Trigger families of Neural Cleanse on the FP model.
        max_targets: Most classes searched; with more classes, a ranked shortlist.
        probe_steps: Steps of the short differential probe that ranks a shortlist.
        eval_images: Most calibration images set aside to check the triggers.
    """

    deployment: Deployment
    budget: float | None = None
    holdout: int = 1000
    search: SearchConfig = field(default_factory=SearchConfig)
    rule: VerdictRule = field(default_factory=VerdictRule)
    families: tuple[str, ...] = ("patch", "blend")
    fp_families: tuple[str, ...] = ("patch",)
    max_targets: int = 10
    probe_steps: int = 20
    eval_images: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.deployment, Deployment):
            raise EfrapError(f"deployment must be a Deployment, got {self.deployment!r}")
        self.deployment.quantized()
        # The scan's own floor on the same count: a quarter of the images check the triggers.
        limits.SCAN_CALIB.check(self.deployment.num_calib, "number of calibration images")
        if self.budget is not None:
            checks.finite(self.budget, "budget (seconds)", low=0.0, low_open=True)
        checks.integer(self.holdout, "held-out images", low=1)
        if not self.families:
            raise EfrapError("the differential search needs at least one trigger family")
        for family in (*self.families, *self.fp_families):
            checks.string(family, "trigger family", FAMILIES)
        # An outlier test needs at least three classes to compare.
        checks.integer(self.max_targets, "most searched classes", low=3)
        checks.integer(self.probe_steps, "probe steps", low=1)
        checks.integer(self.eval_images, "evaluation images", low=1)

    # Views of the deployment, read where the scan needs them.
    @property
    def scheme(self) -> Scheme:
        """The deployment's scheme."""
        return self.deployment.quantized()

    @property
    def calib(self) -> str:
        """The data set whose training split the scan reads."""
        return self.deployment.calib_data

    @property
    def num_calib(self) -> int:
        """Calibration images."""
        return self.deployment.num_calib

    @property
    def seed(self) -> int:
        """The scan's one seed."""
        return self.deployment.seed

    @property
    def opt_level(self) -> str:
        """onnxruntime optimization level of the figures."""
        return self.deployment.opt_level

    @property
    def provider(self) -> str:
        """onnxruntime provider."""
        return self.deployment.provider

    @property
    def preprocess(self) -> dict | None:
        """The user's preprocessing fields (None: what the model records)."""
        return self.deployment.preprocess

    def to_json(self) -> dict[str, object]:
        """JSON-ready settings (the report's `settings`)."""
        return {"scheme": self.scheme.name, "calib": self.calib, "num_calib": self.num_calib,
                "seed": self.seed, "budget": self.budget, "holdout": self.holdout,
                "search": asdict(self.search), "rule": asdict(self.rule), "families": list(self.families),
                "fp_families": list(self.fp_families), "max_targets": self.max_targets,
                "probe_steps": self.probe_steps, "eval_images": self.eval_images,
                "opt_level": self.opt_level, "provider": self.provider}


@dataclass
class _Data:
    """The scan's images in [0, 1] and their FP clean predictions."""

    opt_x: ImageSet
    opt_y: torch.Tensor
    eval_x: ImageSet
    eval_y: torch.Tensor


@dataclass
class _Clock:
    """The time budget: the scan's end, the searches' end before it, and their shares."""

    end: float
    search_end: float
    left: int = 0

    def next_deadline(self) -> float:
        """Deadline of the next search: an equal share of the searches' time left."""
        now = time.perf_counter()
        share = (self.search_end - now) / max(1, self.left)
        self.left -= 1
        return now + share if math.isfinite(share) else math.inf

    def out(self) -> bool:
        """Whether the searches' time is up."""
        return time.perf_counter() >= self.search_end

    def fits(self, seconds: float) -> bool:
        """Whether `seconds` more still end within the budget."""
        return time.perf_counter() + seconds <= self.end


def _raw(images: object, what: str) -> ImageSet:
    """Images in [0, 1] behind model-ready inputs (the trigger is stamped before preprocessing)."""
    if not isinstance(images, PreparedImages):
        raise EfrapError(f"{what}: the scan stamps triggers on images in [0, 1] before preprocessing; "
                         "give a data set (fashion-mnist, cifar10:PATH, imagefolder:PATH, ...), not "
                         "model-ready arrays")
    return ImageSet(images.dataset, images.index)


def _split(raw: ImageSet, labels: torch.Tensor, options: ScanOptions) -> _Data:
    """Optimisation and evaluation images, chosen with the seed."""
    n = len(raw)
    n_eval = max(1, min(options.eval_images, n // 4))
    perm = np.random.default_rng(derive(options.seed, "scan-eval")).permutation(n)
    ev, opt = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
    return _Data(raw.subset(opt), labels[opt], raw.subset(ev), labels[ev])


def _search(wake: Side, keep: Side | None, data: _Data, target: int, family: str, options: ScanOptions,
            deadline: float, stop: float, cfg: SearchConfig | None = None) -> Found:
    mode = "fp" if keep is None else f"diff-{wake.name}"
    seed = derive(options.seed, "scan", mode, family, str(target))
    sizes = batches([wake] if keep is None else [wake, keep], tuple(data.opt_x.shape[1:]))
    return search_class(wake, keep, data.opt_x, data.opt_y, data.eval_x, data.eval_y, target, family,
                        cfg or options.search, seed, deadline, stop, sizes)


def shortlist(fp: Side, q: Side, data: _Data, drifts: np.ndarray, options: ScanOptions,
              clock: _Clock) -> tuple[list[int] | None, str | None]:
    """The classes to search: all of them, or the `max_targets` most promising.

    With more classes than `max_targets`, the 4 x `max_targets` classes with the largest
    drift get a short differential probe each (no size term), and those whose probe
    succeeds most (drift breaking ties) are kept. None when the budget ran out first.
    """
    classes = len(drifts)
    if classes <= options.max_targets:
        return list(range(classes)), None
    pool = [int(c) for c in np.argsort(-drifts, kind="stable")[: 4 * options.max_targets]]
    probe = SearchConfig(**{**asdict(options.search), "steps": options.probe_steps,
                            "patience": options.probe_steps, "cost_init": 1e-6})
    small = _Data(data.opt_x, data.opt_y, data.eval_x.subset(slice(0, 64)), data.eval_y[:64])
    scores = []
    bar = Progress(f"scan: probing {len(pool)} of {classes} classes", total=len(pool))
    for c in pool:
        found = _search(q, fp, small, c, options.families[0], options,
                        min(clock.search_end, time.perf_counter() + 10.0), clock.search_end, probe)
        if clock.out():
            bar.close()
            return None, None  # a ranking from a partial probe would pick the classes by chance
        scores.append((found.success, float(drifts[c]), c))
        bar.update(postfix=f"class {c}: {100 * found.success:.0f}%")
    bar.close()
    keep = [c for _, _, c in sorted(scores, key=lambda s: (-s[0], -s[1], s[2]))[: options.max_targets]]
    return keep, (f"{classes} classes: searched the {len(keep)} best of {len(pool)} probed, ranked by "
                  "clean-data drift then a short differential probe")


def _test(name: str, searches: dict[int, list[Found]], pick: Callable[[Found], bool],
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


def _best(results: list[Found]) -> Found | None:
    """The smallest found trigger, else the one closest to success."""
    if not results:
        return None
    found = [f for f in results if f.found]
    if found:
        return min(found, key=lambda f: f.size)
    return max(results, key=lambda f: f.success)


def _logits(sessions: dict[str, Session], raw: ImageSet, pre: Preprocess,
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


def _ort_batch(st: _State) -> int | None:
    """Images per onnxruntime pass: sized by the FP model's activations once its side exists."""
    return None if st.fp is None else st.fp.logits_batch(tuple(st.raw.shape[1:]))


def _figures(trigger: PatternTrigger, raw: ImageSet, pre: Preprocess, sessions: dict[str, Session],
             fp_pred: np.ndarray, clean: dict[str, np.ndarray], batch: int | None = None) -> Figures:
    """The trigger's attack success in onnxruntime on held-out images (`batch` at a time)."""
    logits = _logits(sessions, raw, pre, trigger, batch)
    asr = {name: attack_success(logits[name], fp_pred, trigger.target).rate for name in sessions}
    agreement = {name: float((pred == fp_pred).mean()) for name, pred in clean.items()}
    return Figures(asr=asr, agreement=agreement, images=len(raw),
                   non_target_images=int((fp_pred != trigger.target).sum()))


def _load_defended(path: str, model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    defended = load_model(path)
    if image_input(defended, path).shape[1:] != image_input(model, source).shape[1:]:
        raise EfrapError(f"{path}: the defended model's input does not match {source}'s")
    check_logits(defended, path)
    if not any(n.op_type == "DequantizeLinear" for n in defended.graph.node):
        raise EfrapError(f"{path}: --defended must be a quantized (QDQ) model, e.g. from efrap defend")
    return defended


def _static_classes(model: onnx.ModelProto) -> int:
    """The number of classes the graph's first output declares (0 when it is not a fixed number)."""
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return int(dims[1].dim_value) if len(dims) == 2 and dims[1].HasField("dim_value") else 0


@dataclass
class _State:
    """What a scan has built and measured so far; the time budget may stop it at any stage.

    Attributes:
        stopped: The stage the budget stopped the scan before or in (None: not stopped).
        pass_seconds: What one pass of the onnxruntime sessions over the held-out images
            took (preprocessing included), measured on the clean images.
    """

    options: ScanOptions
    model_path: str
    model: onnx.ModelProto
    images: object
    pre: Preprocess
    raw: ImageSet
    raw_hold: ImageSet
    clock: _Clock
    classes: int
    defended_path: str | None = None
    defended_model: onnx.ModelProto | None = None
    qdq: onnx.ModelProto | None = None
    fp: Side | None = None
    q: Side | None = None
    defended_side: Side | None = None
    data: _Data | None = None
    drifts: np.ndarray | None = None
    sessions: dict[str, Session] = field(default_factory=dict)
    clean: dict[str, np.ndarray] = field(default_factory=dict)
    parity: dict[str, float] = field(default_factory=dict)
    pass_seconds: float = 0.0
    targets: list[int] | None = None
    planned: tuple[tuple[int, str, str], ...] = ()
    defended_planned: tuple[tuple[int, str, str], ...] = ()
    searches: dict[int, list[Found]] = field(default_factory=dict)
    defended_searches: dict[int, list[Found]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    stopped: str | None = None

    def figure_seconds(self) -> float:
        """What one triggered pass over the held-out images may take."""
        return FIGURE_MARGIN * self.pass_seconds


def _build_sides(st: _State) -> None:
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
    st.data = _split(st.raw, fp_logits.argmax(1), options)
    st.drifts = drift(fp_logits, q_logits)
    if st.defended_model is not None and st.defended_path is not None:
        st.defended_side = qdq_side("defended", st.defended_model, st.pre, st.defended_path,
                                    options.search.relu_slope)


def _measure_clean(st: _State) -> None:
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
    st.clean = {name: logits.argmax(1) for name, logits in _logits(st.sessions, st.raw_hold, st.pre,
                                                                      batch=_ort_batch(st)).items()}
    st.pass_seconds = time.perf_counter() - t0
    st.parity = {"fp": float((st.fp.logits(st.raw_hold).argmax(1).numpy() != st.clean["fp"]).mean()),
                 "nearest": float((st.q.logits(st.raw_hold).argmax(1).numpy() != st.clean["nearest"]).mean())}


def _run_searches(st: _State) -> None:
    """Every planned search, each within its share of what the budget leaves."""
    assert st.fp is not None and st.q is not None and st.data is not None and st.targets is not None
    options, clock = st.options, st.clock
    jobs: list[tuple[int, Side, Side | None, str]] = []
    for c in st.targets:
        jobs += [(c, st.q, st.fp, f) for f in options.families]
        jobs += [(c, st.fp, None, f) for f in options.fp_families]
    if st.defended_side is not None:
        jobs += [(c, st.defended_side, st.fp, f) for c in st.targets for f in options.families]
    clock.left = len(jobs)
    bar = Progress(f"scan: {len(jobs)} trigger searches over {len(st.targets)} classes", total=len(jobs))
    for c, wake, keep, family in jobs:
        if clock.out():
            st.stopped = "the searches"
            break
        found = _search(wake, keep, st.data, c, family, options, clock.next_deadline(), clock.search_end)
        memory.trim()  # one search's activations and gradients are not the next one's floor
        (st.defended_searches if wake is st.defended_side else st.searches).setdefault(c, []).append(found)
        size = f"size {found.size:.3f}" if found.found else "none"
        label = "fp" if keep is None else f"{wake.name} vs fp"
        bar.update(postfix=f"class {c} {label} {family}{' (cut short)' if found.cut_short else ''}: {size}")
    bar.close()


def _build(st: _State) -> None:
    """The stages before the decision, each started only while the budget lasts
    (`st.stopped` names the stage it ran out before or in)."""
    options, clock = st.options, st.clock
    for stage, step in (("the nearest deployment", _build_sides),
                        ("the clean held-out figures", _measure_clean)):
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
    st.planned = tuple((c, mode, f) for c in st.targets for mode, fams in
                       (("diff", options.families), ("fp", options.fp_families)) for f in fams)
    if st.defended_side is not None:
        st.defended_planned = tuple((c, "diff", f) for c in st.targets for f in options.families)
    _run_searches(st)


def _incomplete(coverage: dict[str, object], budget: float | None) -> str:
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
    model = load_model(model_path)
    image_input(model, model_path)
    check_logits(model, model_path)
    if fixed_batch(model) is not None:
        raise EfrapError(f"{model_path}: the input has a fixed batch size ({fixed_batch(model)}); the scan "
                         "runs batches of images (export with a dynamic batch)")
    defended_model = _load_defended(defended, model, model_path) if defended is not None else None
    # The data are read whatever the budget, so that a mistake in them is always one line.
    images, pre = calibration_images(model, options.calib, options.num_calib, options.seed, model_path,
                                     options.preprocess)
    raw = _raw(images, options.calib)
    hold, _ = holdout_images(model, options.calib, options.num_calib, options.holdout, options.seed,
                             model_path, options.preprocess)
    st = _State(options=options, model_path=model_path, model=model, images=images, pre=pre, raw=raw,
                raw_hold=_raw(hold, options.calib), clock=_Clock(end=end, search_end=end),
                classes=_static_classes(model), defended_path=defended, defended_model=defended_model)
    _build(st)
    searches, clock = st.searches, st.clock

    diff_test = _test("differential", searches, lambda f: f.mode == "diff", options.rule)
    fp_test = _test("fp", searches, lambda f: f.mode == "fp", options.rule)
    verdict = decide(diff_test, fp_test)
    chosen: Found | None
    if verdict.verdict == "fp-backdoor":
        chosen = _best([f for f in searches.get(verdict.target, []) if f.mode == "fp"])  # type: ignore[arg-type]
    else:
        cand = diff_test.candidate
        pool = [f for fs in searches.values() for f in fs if f.mode == "diff"]
        chosen = _best([f for f in pool if f.target == cand]) if cand is not None else _best(pool)
    trigger = recovered_trigger(chosen) if chosen is not None else None

    figures = None
    if trigger is not None and st.sessions:
        if clock.fits(st.figure_seconds()):
            log("scan: measuring in onnxruntime on held-out images")
            figures = _figures(trigger, st.raw_hold, pre, st.sessions, st.clean["fp"], st.clean,
                               _ort_batch(st))
        else:
            st.stopped = st.stopped or "the held-out figures"
    coverage = Coverage(planned=st.planned, defended_planned=st.defended_planned,
                        shortlisted=st.targets is not None, figures=figures is not None, stopped=st.stopped)
    if not coverage.complete(searches):
        # A search that never ran found nothing: no verdict rests on it.
        verdict = inconclusive(verdict, _incomplete(coverage.to_json(st.classes, searches), options.budget))
        st.notes.append(verdict.reason)

    defended_part = None
    defended_seconds = None
    if defended_model is not None and defended is not None:
        t_def = time.perf_counter()
        d_test = _test("differential", st.defended_searches, lambda f: True, options.rule)
        d_verdict = decide(d_test, fp_test)
        own_found = _best([f for fs in st.defended_searches.values() for f in fs
                           if d_test.candidate is None or f.target == d_test.candidate])
        own = None
        if own_found is not None and st.sessions and clock.fits(st.figure_seconds()):
            own = (own_found, _figures(recovered_trigger(own_found), st.raw_hold, pre, st.sessions,
                                       st.clean["fp"], st.clean, _ort_batch(st)))
        d_states = class_states(st.classes, st.defended_planned, st.targets is not None, st.defended_searches)
        d_complete = (verdict.verdict != "inconclusive" and own is not None
                      and all(v in ("searched", "not shortlisted") for v in d_states.values()))
        if not d_complete:
            d_cov = Coverage(planned=st.defended_planned, defended_planned=(),
                             shortlisted=st.targets is not None,
                             figures=own is not None and figures is not None, stopped=st.stopped)
            d_verdict = inconclusive(d_verdict, "defended part: " + _incomplete(
                d_cov.to_json(st.classes, st.defended_searches), options.budget))
        defended_part = DefendedScan(model=defended, model_sha256=file_sha256(defended), recovered=figures,
                                     verdict=d_verdict, searches=st.defended_searches, own_trigger=own,
                                     states={c: v for c, v in d_states.items() if v != "not shortlisted"})
        defended_seconds = time.perf_counter() - t_def + sum(
            f.seconds for fs in st.defended_searches.values() for f in fs)

    provider = st.sessions["fp"].provider if st.sessions else options.provider
    provenance = {
        "data": options.calib, "scheme": options.scheme.to_json(), "seed": options.seed,
        "calibration_images": len(raw), "search_images": None if st.data is None else len(st.data.opt_x),
        "evaluation_images": None if st.data is None else len(st.data.eval_x),
        "holdout_images": len(st.raw_hold), "preprocessing": pre.to_json(),
        "onnxruntime": {"opt_level": options.opt_level, "provider": provider},
        "threads": torch.get_num_threads(), "versions": versions(),
    }
    cut = verdict.verdict == "inconclusive" or (defended_part is not None
                                               and defended_part.verdict.verdict == "inconclusive")
    drifts = () if st.drifts is None else tuple(float(d) for d in st.drifts)
    return ScanReport(
        model=model_path, model_sha256=file_sha256(model_path), verdict=verdict, trigger=trigger,
        trigger_found=chosen, figures=figures, classes=st.classes, searched=tuple(st.targets or ()),
        drift=drifts, searches=searches, parity=st.parity, defended=defended_part,
        settings=options.to_json(), provenance=provenance, cut_short=cut, coverage=coverage,
        seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start,
        defended_seconds=defended_seconds, notes=tuple(st.notes), rule=options.rule)
