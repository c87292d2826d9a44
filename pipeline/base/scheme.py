"""Quantization schemes as data.

A scheme says how weights and activations are quantized: bit-width, symmetric
or asymmetric grid, per-channel or per-tensor, and which observer picks the
range. Presets cover the common cases; any other combination is a JSON or TOML
file with the same fields, for example::

    name = "w4a8-ort"
    first_last_bits = 8
    [weight]
    bits = 4
    symmetric = true
    per_channel = true
    symmetric_range = "full"     # [-8, 7] like onnxruntime's quantize_static
    [activation]
    bits = 8
    symmetric = false
    observer = "minmax"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pipeline.base import checks
from pipeline.base.errors import EfrapError

WEIGHT_OBSERVERS = ("minmax", "mse")
ACTIVATION_OBSERVERS = ("minmax", "percentile", "mse")
SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class TensorQuant:
    """How one kind of tensor (weights or activations) is quantized.

    Attributes:
        bits: 8 or 4.
        symmetric: zero point fixed at 0 and a signed grid; else an unsigned grid
            [0, 2^bits - 1] with a zero point.
        per_channel: one scale per output channel (weights only).
        observer: how the range is chosen (minmax, mse, percentile).
        percentile: upper percentile for the percentile observer.
        symmetric_range: "restricted" ([-127, 127], [-7, 7]; scale max|x| / qmax) or
            "full" ([-128, 127], [-8, 7]; scale 2 max|x| / (qmax - qmin)).
        reduce_range: use one bit less of the grid (int8 weights in [-63, 63]); avoids
            16-bit saturation in fused u8s8 kernels on CPUs without VNNI.
    """

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False
    observer: str = "minmax"
    percentile: float = 99.99
    symmetric_range: str = "restricted"
    reduce_range: bool = False

    @property
    def qmin(self) -> int:
        """Smallest integer of the grid."""
        return self.qrange[0]

    @property
    def qmax(self) -> int:
        """Largest integer of the grid."""
        return self.qrange[1]

    @property
    def qrange(self) -> tuple[int, int]:
        """(qmin, qmax) of the integer grid."""
        bits = self.bits - 1 if self.reduce_range else self.bits
        if not self.symmetric:
            return 0, 2**bits - 1
        if self.symmetric_range == "full":
            return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1

    @property
    def signed(self) -> bool:
        """Whether the integers are stored in a signed type."""
        return self.symmetric

    def with_bits(self, bits: int) -> TensorQuant:
        """The same settings at another bit-width."""
        return replace(self, bits=bits)


@dataclass(frozen=True)
class Scheme:
    """A full quantization scheme.

    Attributes:
        name: Preset or file name, recorded in outputs.
        weight: Weight quantization.
        activation: Activation quantization (always per tensor).
        first_last_bits: If set, the first layer (reading the image) and the last
            (producing the logits) use this many bits for their weights and their
            input activations.
        layers: Per-layer bits by node name ({"weight_bits": 8, "activation_bits": 8}),
            over everything else; activation bits apply to the point the layer reads.
    """

    name: str
    weight: TensorQuant
    activation: TensorQuant
    first_last_bits: int | None = None
    notes: str = field(default="", compare=False)
    layers: dict[str, dict[str, int]] = field(default_factory=dict)

    def weight_quant(self, edge: bool, node: str = "") -> TensorQuant:
        """How a layer's weight is quantized; `edge`: the first or the last layer.

        This is the one owner of the bit rules: a layer's own bits in `layers`, else
        `first_last_bits` for the layer reading the image and the layer producing the
        logits, else the scheme's.
        """
        own = self.layers.get(node, {}).get("weight_bits")
        if own is not None:
            return self.weight.with_bits(own)
        return self.weight.with_bits(self.first_last_bits) if edge and self.first_last_bits \
            else self.weight

    def activation_quant(self, edge: bool, readers: tuple[str, ...] = ()) -> TensorQuant:
        """How an activation point is quantized; `edge`: read by the first or last layer.

        A point read by layers with their own activation bits takes the most of them.
        """
        own = [self.layers[r]["activation_bits"] for r in readers
               if "activation_bits" in self.layers.get(r, {})]
        if own:
            return self.activation.with_bits(max(own))
        return self.activation.with_bits(self.first_last_bits) if edge and self.first_last_bits \
            else self.activation

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict that `scheme_from_dict` reads back."""
        data = asdict(self)
        data.pop("notes")
        return data


PRESETS: dict[str, Scheme] = {
    "w8a8": Scheme(
        name="w8a8",
        weight=TensorQuant(bits=8, symmetric=True, per_channel=True, observer="minmax"),
        activation=TensorQuant(bits=8, symmetric=False, per_channel=False, observer="minmax"),
        notes="int8 symmetric per-channel weights, uint8 asymmetric per-tensor activations; "
        "onnxruntime fuses it into QLinearConv",
    ),
    "w4a4": Scheme(
        name="w4a4",
        weight=TensorQuant(bits=4, symmetric=False, per_channel=True, observer="mse"),
        activation=TensorQuant(bits=4, symmetric=False, per_channel=False, observer="mse"),
        first_last_bits=8,
        notes="EFRAP paper: 4-bit asymmetric per-channel weights (MSE search), 4-bit "
        "asymmetric per-tensor activations, first and last layers at 8 bits",
    ),
    "w4a8-asym": Scheme(
        name="w4a8-asym",
        weight=TensorQuant(bits=4, symmetric=False, per_channel=True, observer="mse"),
        activation=TensorQuant(bits=8, symmetric=False, per_channel=False, observer="mse"),
        first_last_bits=8,
        notes="the paper's 4-bit weight grid (asymmetric, per channel, MSE search) with 8-bit "
        "activations: low-bit rounding only in the weights",
    ),
    "w4a8": Scheme(
        name="w4a8",
        weight=TensorQuant(bits=4, symmetric=True, per_channel=True, observer="minmax",
                           symmetric_range="full"),
        activation=TensorQuant(bits=8, symmetric=False, per_channel=False, observer="minmax"),
        notes="4-bit symmetric per-channel weights on onnxruntime quantize_static's "
        "[-8, 7] grid, uint8 activations",
    ),
}
#: The scheme every command and config uses when none is named: 8-bit weights and activations,
#: as onnxruntime's quantize_static and modelopt default to.
DEFAULT_SCHEME = "w8a8"


_FIELD_CHECKS = {
    "bits": lambda v, w: checks.integer(v, w),
    "symmetric": checks.boolean,
    "per_channel": checks.boolean,
    "observer": lambda v, w: checks.string(v, w),
    "percentile": lambda v, w: checks.finite(v, w),
    "symmetric_range": lambda v, w: checks.string(v, w, ("restricted", "full")),
    "reduce_range": checks.boolean,
}


def _tensor_quant(data: object, where: str, source: str) -> TensorQuant:
    raw = checks.table(data, f"{source}: '{where}'", set(_FIELD_CHECKS))
    values = {key: _FIELD_CHECKS[key](value, f"{source}: {where}.{key}") for key, value in raw.items()}
    tq = TensorQuant(**values)
    observers = WEIGHT_OBSERVERS if where == "weight" else ACTIVATION_OBSERVERS
    if tq.bits not in SUPPORTED_BITS:
        raise EfrapError(f"{source}: {where}.bits must be one of {SUPPORTED_BITS}, got {tq.bits}")
    if tq.observer not in observers:
        raise EfrapError(f"{source}: {where}.observer must be one of {observers}, got '{tq.observer}'")
    if where == "activation" and tq.per_channel:
        raise EfrapError(f"{source}: per-channel activations are not supported")
    if not 50.0 < tq.percentile <= 100.0:
        raise EfrapError(f"{source}: {where}.percentile must be in (50, 100]")
    return tq


def scheme_from_dict(data: object, source: str = "scheme") -> Scheme:
    """Validate and build a scheme from parsed JSON/TOML data (types exact, ranges checked)."""
    raw = checks.table(data, f"{source}: the scheme",
                       {"name", "weight", "activation", "first_last_bits", "notes", "layers"})
    for key in ("weight", "activation"):
        if key not in raw:
            raise EfrapError(f"{source}: the scheme needs a '{key}' table")
    flb = raw.get("first_last_bits")
    if flb is not None and checks.integer(flb, f"{source}: first_last_bits") not in SUPPORTED_BITS:
        raise EfrapError(f"{source}: first_last_bits must be one of {SUPPORTED_BITS} or absent")
    name = checks.string(raw.get("name", Path(source).stem), f"{source}: name")
    notes = checks.string(raw.get("notes", ""), f"{source}: notes")
    layers = {}
    for node, bits in checks.table(raw.get("layers", {}), f"{source}: layers").items():
        table = checks.table(bits, f"{source}: layers.{node}", {"weight_bits", "activation_bits"})
        layers[str(node)] = {key: checks.integer(value, f"{source}: layers.{node}.{key}")
                             for key, value in table.items()}
        if any(v not in SUPPORTED_BITS for v in layers[str(node)].values()):
            raise EfrapError(f"{source}: layers.{node} bits must be one of {SUPPORTED_BITS}")
    return Scheme(
        name=name,
        weight=_tensor_quant(raw["weight"], "weight", source),
        activation=_tensor_quant(raw["activation"], "activation", source),
        first_last_bits=flb,
        notes=notes,
        layers=layers,
    )


def load_scheme(name_or_path: str) -> Scheme:
    """A preset by name, or a scheme read from a .json or .toml file.

    Raises:
        EfrapError: unknown preset, unreadable file, or invalid settings.
    """
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if path.suffix.lower() not in (".json", ".toml"):
        raise EfrapError(
            f"unknown scheme '{name_or_path}': use a preset ({', '.join(PRESETS)}) "
            "or a .json/.toml scheme file"
        )
    return scheme_from_dict(checks.load_config(path, "scheme"), str(path))


def scheme_files(name_or_path: str) -> list[Path]:
    """The files a scheme argument reads (none for a preset)."""
    return [] if name_or_path in PRESETS else [Path(name_or_path)]
