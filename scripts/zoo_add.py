"""Add (or replace) a QCB model in models/zoo/manifest.json, or remove an entry.

Usage:
    python scripts/zoo_add.py NAME --rebuild "efrap attack ..." --build-time SECONDS
        [--threads N] [--default]
    python scripts/zoo_add.py NAME --remove

NAME.onnx and NAME.trigger.json must already be in models/zoo/ (copied from
`efrap attack`'s output). Architecture, data set, attack, scheme, carrier and
normalisation are read from the model's metadata; the sha256 is computed; the FP
figures are measured in onnxruntime (faithful level, CPU) on the test split. Run
`python bench/zoo_table.py` afterwards for the quantized figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Imported for what it installs: torch's image resize, which a model that resizes its input needs
# (the base layer and verification import no torch, so a script that only verifies must ask for it).
import pipeline.torch_backend  # noqa: F401
from models.zoo import MANIFEST, ZOO_DIR
from pipeline.base.deployment import Deployment
from pipeline.base.onnx_io import get_metadata, image_input, input_shape, load_model
from pipeline.base.preprocess import resolve
from pipeline.base.safe_io import file_sha256, write_text
from pipeline.base.trigger import load_trigger
from validators.verify import VerifyOptions, verify_model


def entry_for(name: str, rebuild: str, build_time: float, threads: int) -> dict:
    """A manifest entry for models/zoo/NAME.onnx, with FP figures measured in onnxruntime."""
    path = ZOO_DIR / f"{name}.onnx"
    trig = ZOO_DIR / f"{name}.trigger.json"
    model = load_model(path)
    meta = get_metadata(model)
    settings = json.loads(meta["efrap.attack.settings"])
    if not rebuild.startswith("efrap attack ") or f"--method {meta['efrap.attack']}" not in rebuild:
        raise SystemExit(f"{name}: the rebuild command does not match the model's attack")
    norm = resolve(model, image_input(model, str(path)), source=str(path))
    report = verify_model(str(path),
                          VerifyOptions(Deployment(data=settings["data"], provider="cpu"),
                                        trigger=str(trig))).to_json()
    return {
        "name": name,
        "file": path.name,
        "sha256": file_sha256(path),
        "architecture": settings["arch"],
        "dataset": settings["data"],
        "input_shape": list(input_shape(model)),
        "normalization": {"mean": list(norm.mean), "std": list(norm.std)},
        "kind": "qcb",
        "default": False,
        "rebuild": rebuild,
        "build_time_s": round(build_time, 1),
        "build_threads": threads,
        "fp_metrics": {
            "clean_accuracy": report["clean_accuracy"],
            "attack_success_rate": report["attack_success_rate"],
            "attack_success_rate_all": report["attack_success_rate_all"],
            "opt_level": report["opt_level"],
            "provider": report["provider"],
        },
        "attack": meta["efrap.attack"],
        "scheme": meta["efrap.attack.scheme"],
        "trigger": trig.name,
        "target": load_trigger(trig).target,
        "carrier": settings.get("carrier", "scheme"),
        "inflate": settings.get("inflate"),
    }


def main() -> None:
    """Edit the manifest."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--rebuild", help="the exact command that built the model")
    parser.add_argument("--build-time", type=float, help="measured build time in seconds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the build")
    parser.add_argument("--default", action="store_true", help="make it the demo's default")
    parser.add_argument("--remove", action="store_true", help="remove the entry instead")
    args = parser.parse_args()
    manifest = json.loads(MANIFEST.read_text())
    models = [e for e in manifest["models"] if e["name"] != args.name]
    if not args.remove:
        if args.rebuild is None or args.build_time is None:
            parser.error("--rebuild and --build-time are required when adding")
        entry = entry_for(args.name, args.rebuild, args.build_time, args.threads)
        if args.default:
            for e in models:
                e["default"] = False
            entry["default"] = True
        models.append(entry)
    manifest["models"] = models
    # Not write_json: it sorts keys, and the manifest keeps its field order.
    text = json.dumps(manifest, indent=2) + "\n"
    write_text(MANIFEST, text)
    print(f"{MANIFEST.name}: {'removed' if args.remove else 'wrote'} {args.name}")


if __name__ == "__main__":
    main()
