"""The names of the devices torch work may run on (`--device`).

The choice itself (`pick_device`) needs torch and lives in `pipeline.torch_backend`; the
names stay here, so that argument parsers and manifests check them without torch.
"""

from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda")
