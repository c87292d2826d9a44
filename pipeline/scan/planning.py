"""Which classes a scan searches, and the searches themselves within the budget.

With more classes than `max_targets`, a shortlist ranked by the clean-data drift of the
nearest model and a short probe of the differential objective per class (K-Arm's idea
of spending the search on the promising classes: Shen et al., "Backdoor Scanning for
Deep Neural Networks through K-Arm Optimization", ICML 2021); then per class the
differential searches and Neural Cleanse on the FP model, each within its share.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from pipeline.base import memory
from pipeline.base.progress import Progress
from pipeline.base.seeds import derive
from pipeline.scan.images import ImageSet
from pipeline.scan.options import ScanOptions
from pipeline.scan.search import Found, SearchConfig, search_class
from pipeline.scan.sides import Side, batches
from pipeline.scan.state import Clock, ScanData, ScanState


def split_images(raw: ImageSet, labels: torch.Tensor, options: ScanOptions) -> ScanData:
    """Optimisation and evaluation images, chosen with the seed."""
    n = len(raw)
    n_eval = max(1, min(options.eval_images, n // 4))
    perm = np.random.default_rng(derive(options.seed, "scan-eval")).permutation(n)
    ev, opt = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
    return ScanData(raw.subset(opt), labels[opt], raw.subset(ev), labels[ev])


def search_one(wake: Side, keep: Side | None, data: ScanData, target: int, family: str, options: ScanOptions,
            deadline: float, stop: float, cfg: SearchConfig | None = None) -> Found:
    mode = "fp" if keep is None else f"diff-{wake.name}"
    seed = derive(options.seed, "scan", mode, family, str(target))
    sizes = batches([wake] if keep is None else [wake, keep], tuple(data.opt_x.shape[1:]))
    return search_class(wake, keep, data.opt_x, data.opt_y, data.eval_x, data.eval_y, target, family,
                        cfg or options.search, seed, deadline, stop, sizes)


def shortlist(fp: Side, q: Side, data: ScanData, drifts: np.ndarray, options: ScanOptions,
              clock: Clock) -> tuple[list[int] | None, str | None]:
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
    small = ScanData(data.opt_x, data.opt_y, data.eval_x.subset(slice(0, 64)), data.eval_y[:64])
    scores = []
    bar = Progress(f"scan: probing {len(pool)} of {classes} classes", total=len(pool))
    for c in pool:
        # A probe is bounded by its steps, never by the wall clock: a probe a slow or loaded
        # machine cut short would rank its class by chance, and the shortlist (so the verdict)
        # would depend on the machine. Only the scan's budget may stop one, and then the
        # ranking is not made at all.
        found = search_one(q, fp, small, c, options.families[0], options, clock.search_end,
                           clock.search_end, probe)
        if found.cut_short or clock.out():
            bar.close()
            return None, None  # a ranking from a partial probe would pick the classes by chance
        scores.append((found.success, float(drifts[c]), c))
        bar.update(postfix=f"class {c}: {100 * found.success:.0f}%")
    bar.close()
    keep = [c for _, _, c in sorted(scores, key=lambda s: (-s[0], -s[1], s[2]))[: options.max_targets]]
    return keep, (f"{classes} classes: searched the {len(keep)} best of {len(pool)} probed, ranked by "
                  "clean-data drift then a short differential probe")


def plan_searches(st: ScanState) -> None:
    """The searches to run over the shortlisted classes (what the coverage counts against)."""
    assert st.targets is not None
    options = st.options
    st.planned = tuple((c, mode, f) for c in st.targets for mode, fams in
                       (("diff", options.families), ("fp", options.fp_families)) for f in fams)
    if st.defended_side is not None:
        st.defended_planned = tuple((c, "diff", f) for c in st.targets for f in options.families)


def run_searches(st: ScanState) -> None:
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
        found = search_one(wake, keep, st.data, c, family, options, clock.next_deadline(), clock.search_end)
        memory.trim()  # one search's activations and gradients are not the next one's floor
        (st.defended_searches if wake is st.defended_side else st.searches).setdefault(c, []).append(found)
        size = f"size {found.size:.3f}" if found.found else "none"
        label = "fp" if keep is None else f"{wake.name} vs fp"
        bar.update(postfix=f"class {c} {label} {family}{' (cut short)' if found.cut_short else ''}: {size}")
    bar.close()
