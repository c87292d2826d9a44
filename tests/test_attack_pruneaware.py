"""The pruning-aware attack: its carriers' constraints on a tiny build, and the checker failing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from models.attacks import get_attack
from models.attacks.base import AttackConfig, AttackOutcome, run_attack
from models.attacks.dormant import Carriers
from models.attacks.pruneaware import (
    CarrierBounds,
    CarrierFigures,
    PruneAwareBackdoor,
    measure_carriers,
)
from pipeline.base.errors import EfrapError
from tests.conftest import require_fashion_mnist

#: A build of seconds: a quarter-width small_cnn, 4,000 training images, short phases.
TINY = AttackConfig(
    scheme="w4a8",
    width=0.25,
    seed=0,
    batch_size=64,
    train_limit=4500,
    val_size=500,
    pretrain_epochs=1,
    epochs=1,
    steps_per_epoch=100,
    num_calib=256,
    recalib_every=40,
)

GOOD = CarrierFigures(
    fire_rates=(0.5,) * 8,
    max_grid_distance=0.15,
    mean_grid_distance=0.01,
    clipped_weights=8,
    clean_gap=0.05,
    trigger_gap=3.0,
    pruned_carriers=0,
    images=256,
)


@pytest.fixture(scope="module")
def built() -> tuple[PruneAwareBackdoor, AttackOutcome]:
    require_fashion_mnist()
    attack = get_attack("pruneaware")
    assert isinstance(attack, PruneAwareBackdoor)
    return attack, run_attack(attack, TINY)


def _measure(attack: PruneAwareBackdoor, out: AttackOutcome) -> CarrierFigures:
    x = out.data.val_x[:256]
    return measure_carriers(
        out.sim,
        Carriers(out.sim, attack.carriers),
        out.data.normalize(x),
        out.data.normalize(out.trigger.apply_torch(x)),
    )


def test_tiny_build_meets_the_carrier_constraints(built: tuple[PruneAwareBackdoor, AttackOutcome]) -> None:
    attack, out = built
    m = out.metrics
    # A QCB: dormant in FP, awake under nearest rounding.
    assert m["q_asr"] > 0.8 and m["fp_asr"] < 0.3 and m["q_cda"] > 0.6, m
    figures = _measure(attack, out)
    assert attack.bounds.violations(figures) == [], figures
    # Each carrier fires far above the default's 3% pruning budget; none would be pruned.
    assert min(figures.fire_rates) >= 0.10 and figures.pruned_carriers == 0
    assert figures.max_grid_distance <= 0.15 + 1e-4
    assert figures.clean_gap < 0.15 < 0.5 < figures.trigger_gap


def test_checker_fails_a_model_that_breaks_the_constraints(
    built: tuple[PruneAwareBackdoor, AttackOutcome],
) -> None:
    attack, out = built
    carriers = Carriers(out.sim, attack.carriers)
    mod = out.sim.layer_modules(carriers.layer)[0]
    held = mod.weight.detach().clone()
    try:
        with torch.no_grad():
            # Off the grid by a third of a step, away from any tie: the distance bound breaks.
            s = float(out.sim.weight_qparams(carriers.layer).scale.reshape(-1)[int(carriers.units[0])])
            row = int(carriers.units[0])
            col = int(mod.weight[row].abs().argmin())
            mod.weight[row, col] += s / 3
        problems = attack.bounds.violations(_measure(attack, out))
        assert any("grid point" in p for p in problems), problems
        with torch.no_grad():
            mod.weight.copy_(held)
            # Carriers that never fire: too rare, and the pruning would take them.
            mod.weight[carriers.units.to(mod.weight.device)] = 0.0
            mod.bias[carriers.units.to(mod.weight.device)] = -1.0
        figures = _measure(attack, out)
        problems = attack.bounds.violations(figures)
        assert max(figures.fire_rates) == 0.0 and figures.pruned_carriers == attack.carriers
        assert any("fires on 0.0%" in p for p in problems) and any("pruned" in p for p in problems)
    finally:
        with torch.no_grad():
            mod.weight.copy_(held)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"fire_rates": (0.5,) * 7 + (0.05,)}, "fires on 5.0%"),
        ({"max_grid_distance": 0.2}, "grid point"),
        ({"clean_gap": 0.3}, "on clean images"),
        ({"trigger_gap": 0.1}, "on triggered"),
        ({"pruned_carriers": 2}, "pruned"),
    ],
)
def test_each_bound_can_fail(change: dict, words: str) -> None:
    bounds = CarrierBounds()
    assert bounds.violations(GOOD) == []
    problems = bounds.violations(replace(GOOD, **change))
    assert len(problems) == 1 and words in problems[0], problems


def test_bounds_are_checked() -> None:
    with pytest.raises(EfrapError):
        CarrierBounds(max_grid_distance=0.7)
    with pytest.raises(EfrapError):
        CarrierBounds(min_fire=1.5)
