"""One line for each figure the command line prints: the glossary of --help and docs/GLOSSARY.md.

`TERMS` is the one source: `efrap --help` shows all of it, each sub-command's --help
the terms it prints (`COMMAND_TERMS`), and docs/GLOSSARY.md holds every line as
``- **TERM**: MEANING`` (tests/test_glossary.py holds the two to each other).
"""

from __future__ import annotations

import textwrap

#: Term as printed -> what it means, one line each.
TERMS: dict[str, str] = {
    "clean accuracy (CDA)": "share of clean labelled images (the test split; in a check, the held-out "
                            "training images) the model puts in their class",
    "attack success (ASR)": "share of triggered images outside the target class (by label; in the scan, "
                            "by the FP model's prediction) that the model puts in the target class; "
                            "(all): the target class's own images counted too",
    "agreement with FP": "share of held-out images whose top-1 class is the full-precision model's",
    "relative output error": "||q - fp|| / ||fp|| of an output over the held-out images (0: the same as FP)",
    "predictions differing from simulation": "share of test images whose top-1 class in onnxruntime differs "
                                             "from the PyTorch simulation's (verify --reference)",
    "flipped 48.61%": "share of a layer's weight integers that differ from nearest rounding's",
    "rec 0.0315 (nearest) -> 0.0316": "the layer's reconstruction loss (--loss, default mse: its output "
                                      "against the FP layer's on the calibration images) with nearest "
                                      "rounding, then with the rounding chosen",
    "rec / round / flip": "a learned layer's loss terms as it goes: reconstruction, rounding regulariser, "
                          "EFRAP's flip penalty",
    "pruned 91 input units": "rare-unit pruning (--prune-rare) zeroed the weights that read the 91 input "
                             "channels or features firing on the fewest calibration images; (x% of "
                             "weights): the share of the layer's weights zeroed",
    "4-bit weights in int8 containers": "the default weight storage writes one byte per 4-bit weight; "
                                        "--weight-storage int4 packs two to a byte",
    "diff / fp": "the scan's two searches: differential (a trigger that wakes the quantized model while FP "
                 "keeps its prediction) and Neural Cleanse on the FP model alone",
    "patch / blend": "trigger families: a masked patch, or a whole-image pattern blended in with one factor",
    "size 2.30% of the image": "a found trigger's mask mean: a patch's share of the image, a blend's factor",
    "anomaly index": "Neural Cleanse's outlier score of a class's smallest trigger size, "
                     "(median(log s) - log s) / (1.4826 MAD(log s)); at the threshold (2) or above, the "
                     "class's trigger is unusually small",
    "confidence": "the scan's certainty in its verdict: a logistic function of the evidence around the "
                  "threshold",
    "ETA 12s, run 3m05s": "time left in this stage at its pace so far, and in the whole run",
}

_QUANTIZE = ("flipped 48.61%", "rec 0.0315 (nearest) -> 0.0316", "rec / round / flip",
             "pruned 91 input units", "4-bit weights in int8 containers", "agreement with FP",
             "relative output error", "clean accuracy (CDA)", "ETA 12s, run 3m05s")
_SCAN = ("diff / fp", "patch / blend", "size 2.30% of the image", "anomaly index", "confidence",
         "attack success (ASR)", "agreement with FP", "ETA 12s, run 3m05s")
#: The terms each sub-command's --help explains (the figures it prints).
COMMAND_TERMS: dict[str, tuple[str, ...]] = {
    "demo": ("clean accuracy (CDA)", "attack success (ASR)", "agreement with FP", "relative output error",
             "flipped 48.61%", "rec 0.0315 (nearest) -> 0.0316", "ETA 12s, run 3m05s"),
    "quantize": _QUANTIZE,
    "defend": _QUANTIZE,
    "verify": ("clean accuracy (CDA)", "attack success (ASR)", "predictions differing from simulation"),
    "scan": _SCAN,
    "audit": _SCAN,
}
#: Width of the glossary's lines in --help.
WIDTH = 100


def glossary(terms: tuple[str, ...] | None = None) -> str:
    """The glossary of --help: one entry per term (all of them when `terms` is None)."""
    lines = ["glossary (docs/GLOSSARY.md):"]
    for term in terms or tuple(TERMS):
        lines.append(textwrap.fill(f"{term}: {TERMS[term]}", WIDTH, initial_indent="  ",
                                   subsequent_indent="      "))
    return "\n".join(lines)
