"""Registry of rounding methods: nearest first, then the learned ones (AdaRound, EFRAP, LAC), then
QVec (data-free per layer, its scale searched on the whole model)."""

from __future__ import annotations

from pipeline.base.errors import EfrapError
from pipeline.rounding.adaround import AdaRound, AdaRoundConfig
from pipeline.rounding.base import (
    AnnealedSettings,
    LayerProblem,
    LearnedSettings,
    RoundingMethod,
    RoundingResult,
    RoundingSettings,
)
from pipeline.rounding.efrap import Efrap, EfrapConfig
from pipeline.rounding.lac import Lac, LacConfig
from pipeline.rounding.nearest import NearestConfig, NearestRounding
from pipeline.rounding.qvec import QVec, QVecConfig

METHODS: dict[str, RoundingMethod] = {
    "nearest": NearestRounding(),
    "adaround": AdaRound(),
    "efrap": Efrap(),
    "lac": Lac(),
    "qvec": QVec(),
}


def register(method: RoundingMethod) -> None:
    """Add a rounding method to the registry under its name."""
    METHODS[method.name] = method


def get_method(name: str) -> RoundingMethod:
    """The rounding method called `name`."""
    if name not in METHODS:
        raise EfrapError(f"unknown rounding method '{name}': choose from {', '.join(METHODS)}")
    return METHODS[name]


def run_needs(name: str, config: RoundingSettings) -> frozenset[str]:
    """What a run of method `name` with `config` asks the orchestrator for: the method's own
    needs, plus the cached layer inputs when rare-unit pruning is on (any method)."""
    return get_method(name).needs(config) | (frozenset({"data"}) if config.prune_rare > 0 else frozenset())


__all__ = [
    "METHODS",
    "AdaRoundConfig",
    "AnnealedSettings",
    "EfrapConfig",
    "LacConfig",
    "LayerProblem",
    "LearnedSettings",
    "NearestConfig",
    "QVecConfig",
    "RoundingMethod",
    "RoundingResult",
    "RoundingSettings",
    "get_method",
    "register",
    "run_needs",
]
