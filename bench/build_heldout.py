"""Build the held-out models of bench/heldout.toml into a cache folder (never git).

Usage: python bench/build_heldout.py [--cache DIR] [--only NAME ...] [--threads N]

Each entry is built by an `efrap attack` (QCB and poisoned models) or `efrap train`
(clean models) child process; trigger files are written first into the cache. A model
whose file exists is skipped, so a killed build resumes. `manifest.json` in the cache
lists every model with its command, trigger, sha256 and build time.

An entry with ``data = "fmnist32"`` is trained on Fashion-MNIST padded to 32x32 and
repeated to three channels (`models/corpus_data.py`, the corpus's CIFAR-style input),
written once into the cache as ``fmnist32.npz`` (uint8) and read by `efrap attack`
as ``npz:`` data; its trigger is made for 3 x 32 x 32 images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.child import run_child
from models.corpus_data import fmnist32
from pipeline.base.safe_io import file_sha256, write_json
from pipeline.base.trigger import PatchTrigger, WarpTrigger, blended, checkerboard, save_trigger

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "bench/heldout.toml"
#: Image shape (channels, height, width) of each `data` an entry may name.
SHAPES = {"fashion-mnist": (1, 28, 28), "fmnist32": (3, 32, 32)}


def default_cache() -> Path:
    """~/.cache/efrap-onnx/heldout, or $EFRAP_HELDOUT_CACHE."""
    return Path(os.environ.get("EFRAP_HELDOUT_CACHE", Path.home() / ".cache/efrap-onnx/heldout"))


def data_of(entry: dict) -> str:
    """The entry's data set name (checked against SHAPES)."""
    data = entry.get("data", "fashion-mnist")
    if data not in SHAPES:
        raise SystemExit(f"{SPEC}: {entry['name']}: unknown data '{data}'")
    return data


def data_spec(data: str, cache: Path) -> str:
    """The `--data` spec of a data set name (writing the padded 32x32 set into the cache once)."""
    if data == "fashion-mnist":
        return data
    path = cache / "fmnist32.npz"
    if not path.exists():
        arrays = {}
        for split in ("train", "test"):
            x, y = fmnist32(split)
            # Pixels are k/255 exactly (padded uint8 images), so uint8 loses nothing.
            arrays[f"x_{split}"] = np.round(x * 255).astype(np.uint8)
            arrays[f"y_{split}"] = y
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    return f"npz:{path}"


def write_trigger(spec: dict, path: Path, shape: tuple[int, int, int]) -> Path:
    """The entry's trigger file (patch or warp JSON, or a pattern trigger with its npz)."""
    spec = dict(spec)
    kind = spec.pop("kind")
    channels, height, width = shape
    if kind == "patch":
        trigger = PatchTrigger(**spec)
    elif kind == "checkerboard":
        trigger = checkerboard(spec.pop("size", None), height, width, channels, **spec)
    elif kind == "blended":
        rng = np.random.default_rng(spec.pop("pattern_seed"))
        trigger = blended(rng.random((channels, height, width)).astype(np.float32), **spec)
    elif kind == "warp":
        trigger = WarpTrigger(**spec)
    else:
        raise SystemExit(f"{SPEC}: unknown trigger kind '{kind}'")
    save_trigger(trigger, path)
    return path


def command(kind: str, entry: dict, cache: Path) -> list[str]:
    """The `efrap` arguments that build one entry."""
    out = cache / f"{entry['name']}.onnx"
    if kind == "clean":
        return ["train", "--arch", entry["arch"], "--width", str(entry["width"]),
                "--seed", str(entry["seed"]), "--epochs", str(entry["epochs"]),
                "-o", str(out.with_suffix(".pt")), "--onnx", str(out)]
    data = data_of(entry)
    trig = write_trigger(entry["trigger"], cache / f"{entry['name']}.spec-trigger.json", SHAPES[data])
    argv = ["attack", "--method", entry["attack"], "--arch", entry["arch"], "--width", str(entry["width"]),
            "--scheme", entry["scheme"], "--seed", str(entry["seed"]), "--epochs", str(entry["epochs"]),
            "--trigger", str(trig), "-o", str(out)]
    if data != "fashion-mnist":
        argv += ["--data", data_spec(data, cache)]
    if "steps_per_epoch" in entry:
        argv += ["--steps-per-epoch", str(entry["steps_per_epoch"])]
    if "inflate" in entry:
        argv += ["--inflate", str(entry["inflate"])]
    argv += [str(a) for a in entry.get("extra", [])]
    return argv


def main() -> None:
    """Build what is missing and update the manifest."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    cache = args.cache or default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    spec = tomllib.loads(SPEC.read_text())
    manifest_path = cache / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"models": {}}
    for kind in ("qcb", "badnets", "clean"):
        for entry in spec.get(kind, []):
            name = entry["name"]
            out = cache / f"{name}.onnx"
            if (args.only and name not in args.only) or (out.exists() and name in manifest["models"]):
                continue
            argv = command(kind, entry, cache)
            print(f"build_heldout: {name}: efrap {' '.join(argv)}", flush=True)
            run = run_child(["-m", "pipeline.cli.main", *argv], cache / f"{name}.log", args.threads)
            if run.exit != 0:
                print(f"build_heldout: {name} failed: {run.last_line}", flush=True)
                continue
            trigger = cache / f"{name}.trigger.json"
            # Re-read before writing: another builder (--only) may have added models meanwhile.
            manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"models": {}}
            manifest["models"][name] = {
                "kind": kind, "command": "efrap " + " ".join(argv), "file": out.name,
                "sha256": file_sha256(out),
                "trigger": trigger.name if trigger.exists() else None, "seconds": run.seconds,
                "threads": args.threads, "entry": entry}
            write_json(manifest, manifest_path)
            print(f"build_heldout: {name} built in {run.seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
