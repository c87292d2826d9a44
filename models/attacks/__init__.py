"""The red-team attack zoo: quantization-conditioned backdoors built against our quantizer.

Each attack trains a model that is benign in full precision and backdoored once
`efrap quantize --method nearest` deploys it under the targeted scheme. The
quantizer is simulated exactly by `models.attacks.qsim.QSim`.

    from models.attacks import get_attack
    from models.attacks.base import AttackConfig, run_attack
    outcome = run_attack(get_attack("pqbackdoor"), AttackConfig(scheme="w4a4"))
"""

from __future__ import annotations

from models.attacks.adaptive import AdaptiveBackdoor
from models.attacks.badnets import BadNets
from models.attacks.base import Attack
from models.attacks.compartifact import CompArtifact
from models.attacks.dormant import DormantBackdoor
from models.attacks.pqbackdoor import PQBackdoor
from models.attacks.pruneaware import PruneAwareBackdoor
from models.attacks.quantization import QuantizationBackdoor
from models.attacks.qura import ROUNDING_ATTACKS as ROUNDING_ATTACKS  # rounding-only: --model FP.onnx
from models.attacks.robust import RobustBackdoor
from pipeline.base.errors import EfrapError

ATTACKS: dict[str, type[Attack]] = {
    CompArtifact.name: CompArtifact,
    QuantizationBackdoor.name: QuantizationBackdoor,
    PQBackdoor.name: PQBackdoor,
    BadNets.name: BadNets,
    RobustBackdoor.name: RobustBackdoor,
    DormantBackdoor.name: DormantBackdoor,
    AdaptiveBackdoor.name: AdaptiveBackdoor,
    PruneAwareBackdoor.name: PruneAwareBackdoor,
}


def get_attack(name: str) -> Attack:
    """A new instance of the attack called `name`.

    Raises:
        EfrapError: no such attack.
    """
    if name not in ATTACKS:
        raise EfrapError(f"unknown attack '{name}': choose one of {', '.join(ATTACKS)}")
    return ATTACKS[name]()
