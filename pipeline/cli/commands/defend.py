"""`efrap defend`: EFRAP (the project's default rule or the release's settings), then its check."""

from __future__ import annotations

import argparse

from pipeline.base.errors import EfrapError
from pipeline.base.safe_io import write_json
from pipeline.cli.args import positive_float
from pipeline.cli.commands.quantize import (
    add_common_quant_args,
    add_rounding_args,
    print_guard,
    print_summary,
    quantize_spec,
    quantize_with,
    rounding_overrides,
)
from pipeline.repair import RepairSettings
from pipeline.rounding.efrap import EFRAP_PRESETS
from pipeline.rounding.settings import DEFAULT_PRESET
from pipeline.scan import scan_model
from pipeline.selfcheck import CANDIDATES, ORDER, CandidateResult, SelfCheckOptions, self_checking_defend


def _candidates(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in CANDIDATES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"'{text}': candidates are a comma-separated list of "
                                         f"{', '.join(CANDIDATES)}")
    return names


def print_candidate(result: CandidateResult) -> None:
    """One candidate's outcome as soon as it exists: verdict, strongest trigger, agreement, time."""
    asr = "none measured" if result.strongest_asr is None else f"{100 * result.strongest_asr:.2f}%"
    agree = "n/a" if result.guard.agreement is None else f"{100 * result.guard.agreement:.2f}%"
    print(f"self-check: {result.name} ({result.method}): audit {result.verdict}, strongest trigger on it "
          f"{asr}, agreement with FP {agree}: {'PASSED' if result.passed else 'FAILED'} "
          f"({'repair' if result.repair is not None else 'rounding'} {result.rounding_seconds:.0f}s, "
          f"audit {result.audit_seconds:.0f}s)", flush=True)
    if result.repair is not None:
        pruned = "; ".join(f"{layer['node']}: units {', '.join(map(str, layer['pruned']))}"
                           for layer in result.repair["layers"]) or "nothing"
        print(f"self-check:   repair pruned {result.repair['pruned_units']} input units over "
              f"{result.repair['judged_layers']} judged layers ({pruned})")
    if not result.passed:
        for why in result.reasons:
            print(f"self-check:   {why}")


def run_self_check(args: argparse.Namespace) -> int:
    """Round the candidates in order, audit each, ship the first that passes; exit 1 when none does."""
    if args.preset != DEFAULT_PRESET or set(rounding_overrides(args)) - {"iters"}:
        raise EfrapError("--self-check rounds its own candidates (--candidates); of the rounding "
                         "options it takes only --iters")
    spec = quantize_spec(args, "efrap", DEFAULT_PRESET)
    check = SelfCheckOptions(candidates=args.candidates, budget=args.check_budget, iters=args.iters,
                             repair=None if args.no_repair else RepairSettings())
    outcome = self_checking_defend(args.model, args.output, spec.quantize_options(), spec.guard_options(),
                                   check, scan_model,
                                   resume=not args.no_resume, on_candidate=print_candidate)
    print_summary(outcome.summary, args.output)
    print_guard(outcome.guard)
    verdict = (f"shipped '{outcome.shipped}', the first candidate that passed" if outcome.passed else
               f"FAILED: no candidate passed; wrote the one with the weakest trigger, '{outcome.shipped}'")
    print(f"self-check: {verdict}")
    if args.json:
        write_json({**outcome.summary.to_json(), "guard": outcome.guard.to_json(),
                    "self_check": outcome.to_json()}, args.json)
    return 0 if outcome.passed else 1


def run(args: argparse.Namespace) -> int:
    """Quantize with EFRAP and check the result against FP on held-out images."""
    if args.self_check:
        return run_self_check(args)
    return quantize_with(args, "efrap", args.preset)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `efrap defend`."""
    p = sub.add_parser(
        "defend", help="quantize with EFRAP (error-guided flipped rounding), then check it against FP",
        description="EFRAP: learn a non-nearest rounding that flips weights with large truncation "
        "error while a layer-wise activation reconstruction loss keeps clean accuracy. Presets: "
        "default (the project's rule, docs/DEFENSE.md: the release's algorithm with truncation "
        "errors in grid steps and flip weight 0.02) and release (the release's settings: 10,000 "
        "iterations per layer, batch 32, Adam lr 1e-3, regulariser 0.01 with b = 2, flip weight 1, "
        "element-wise errors in the conv weight's pre-BN units when the model records its BN "
        "factors, output step sizes learned at 4e-5) and fast (the default's loss and pruning on "
        "sampled (image, position) rows: 2,000 steps at lr 5e-3, a layer stops once its rounding "
        "settles; a candidate, docs/DEFENSE.md). Options below override the preset. The "
        "defended model is then compared with FP on held-out images (the check below).")
    p.add_argument("--preset", choices=tuple(EFRAP_PRESETS), default=DEFAULT_PRESET,
                   help="EFRAP settings: default (the project's rule), release or fast (default: default)")
    add_common_quant_args(p)
    add_rounding_args(p, EFRAP_PRESETS["default"])
    g = p.add_argument_group(
        "self-check (docs/DEFENSE.md, \"The self-check\")",
        "Round the candidates in order and audit each deployed candidate against FP without a "
        "trigger (efrap audit: the scan's differential search with the candidate as the quantized "
        "side), with the check above; ship the first whose audit is clean and whose check passes. "
        "The first candidate whose audit flags it with a trigger it recovered is repaired (the "
        "input units that trigger drives apart from FP are pruned) and the repair, NAME+repair, is "
        "checked and audited next. When none passes, the one with the weakest trigger is written and "
        "the command exits 1.")
    g.add_argument("--self-check", action="store_true", help="check the output and try the next candidate")
    g.add_argument("--candidates", type=_candidates, default=ORDER, metavar="LIST",
                   help=f"candidates in order (default {','.join(ORDER)}; any of {', '.join(CANDIDATES)})")
    g.add_argument("--check-budget", type=positive_float, default=None, metavar="SECONDS",
                   help="seconds each candidate's audit may take (default: no limit); an audit cut "
                   "short is inconclusive and fails its candidate")
    g.add_argument("--no-repair", action="store_true",
                   help="do not repair the first flagged candidate (docs/DEFENSE.md, \"The self-check\")")
    p.set_defaults(func=run)
