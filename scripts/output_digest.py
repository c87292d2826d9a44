"""Run a fixed set of `efrap` commands on the stored zoo and print a digest of every output.

Usage: python scripts/output_digest.py OUT_DIR [--json DIGEST.json] [--compare OLD.json]

A refactor that must not change what users get runs this before and after: quantize
(nearest, AdaRound), defend (short iterations, with a summary), scan (small settings, no
time budget, so it is deterministic), audit, gate and batch (a manifest of two models).
Each ONNX output is hashed as written; each JSON output is hashed after dropping the keys
that measure time or name the machine (wall times, dates, host names), so two runs of the
same code give the same digest. `--compare` prints every file whose digest changed and
exits 1 when any did.

Every command runs with one thread (OMP_NUM_THREADS=1, --threads 1) in OUT_DIR, on a copy
of the zoo models taken there. The gate's and the batch's reports name absolute paths, so
the two runs compared must use the same OUT_DIR (run one, keep its --json, run the other).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "models" / "zoo"
MODELS = ("fmnist_small_cnn_clean.onnx", "fmnist_compartifact_w4a4.onnx",
          "fmnist_compartifact_w4a4.trigger.json")
#: JSON keys whose values measure time or name the machine, not what was computed.
VOLATILE = ("seconds", "time", "date", "host", "elapsed", "started", "finished", "eta",
            "cpu", "wall", "rss", "memory", "pid", "log")

GATE = """model = "fmnist_compartifact_w4a4.onnx"
data = "fashion-mnist"
scheme = "w4a4"
output = "gate-out"
[scan]
num_calib = 64
holdout = 100
max_targets = 3
[defend]
method = "efrap"
iters = 100
num_calib = 128
holdout = 200
[verify]
limit = 500
[thresholds]
max_trigger_asr = "5%"
max_agreement_drop = "5%"
min_accuracy = "85%"
fail_verdicts = ["fp-backdoor"]
"""

BATCH = """[defaults]
scan = false
num_calib = 128
holdout = 200
limit = 500
[[model]]
name = "clean"
path = "fmnist_small_cnn_clean.onnx"
method = "nearest"
scheme = "w8a8"
[[model]]
name = "qcb"
path = "fmnist_compartifact_w4a4.onnx"
method = "efrap"
scheme = "w4a4"
trigger = "fmnist_compartifact_w4a4.trigger.json"
rounding = { iters = 100 }
"""

SMALL = ["--num-calib", "128", "--holdout", "200", "--threads", "1"]
COMMANDS: tuple[tuple[str, ...], ...] = (
    ("quantize", "fmnist_small_cnn_clean.onnx", "--scheme", "w8a8", "-o", "q_nearest.onnx",
     "--summary", "q_nearest.json", *SMALL),
    ("quantize", "fmnist_small_cnn_clean.onnx", "--scheme", "w4a8", "--method", "adaround",
     "--iters", "100", "-o", "q_adaround.onnx", "--summary", "q_adaround.json", "--no-resume", *SMALL),
    ("defend", "fmnist_compartifact_w4a4.onnx", "--scheme", "w4a4", "--iters", "100",
     "-o", "defended.onnx", "--summary", "defended.json", "--no-resume", *SMALL),
    ("verify", "defended.onnx", "--trigger", "fmnist_compartifact_w4a4.trigger.json",
     "--limit", "500", "--json", "verify.json", "--threads", "1"),
    ("scan", "fmnist_compartifact_w4a4.onnx", "--scheme", "w4a4", "--calib", "fashion-mnist",
     "--num-calib", "64", "--holdout", "100", "--max-targets", "3", "--json", "scan.json",
     "--trigger-out", "scan.trigger.json", "--threads", "1"),
    ("audit", "fmnist_small_cnn_clean.onnx", "q_nearest.onnx", "--scheme", "w8a8",
     "--num-calib", "64", "--holdout", "100", "--json", "audit.json",
     "--threads", "1"),
    ("gate", "gate.toml", "--threads", "1"),
    ("batch", "batch.toml", "--out", "batch-out", "--threads", "1"),
)


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()
                if not any(word in k.lower() for word in VOLATILE) and not k.endswith("_s")}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def digest(path: Path) -> str:
    """sha256 of an output: its bytes, or for JSON its content without volatile keys."""
    if path.suffix == ".json":
        data = _clean(json.loads(path.read_text(encoding="utf-8")))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(out: Path) -> dict[str, Any]:
    """Run every command in `out` (emptied first); the exit codes and output digests."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in MODELS:
        shutil.copy(ZOO / name, out / name)
    (out / "gate.toml").write_text(GATE, encoding="utf-8")
    (out / "batch.toml").write_text(BATCH, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    codes: dict[str, int] = {}
    for command in COMMANDS:
        argv = [sys.executable, "-c", "import sys; from efrap_onnx.cli import main; sys.exit(main())",
                *command]
        with open(out / f"{command[0]}.log", "a", encoding="utf-8") as log:
            rc = subprocess.run(argv, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
        codes[" ".join(command[:2])] = rc.returncode
        print(f"{rc.returncode:>3}  efrap {' '.join(command)}", flush=True)
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in (".onnx", ".json")
                   and p.name not in MODELS and ".ckpt" not in str(p))
    return {"exit_codes": codes,
            "files": {str(p.relative_to(out)): digest(p) for p in files}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--compare", type=Path)
    args = parser.parse_args(argv)
    result = run(args.out.resolve())
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if args.compare is None:
        return 0
    old = json.loads(args.compare.read_text(encoding="utf-8"))
    changed = [k for k in sorted(set(old["files"]) | set(result["files"]))
               if old["files"].get(k) != result["files"].get(k)]
    changed += [f"exit code of {k}" for k in old["exit_codes"]
                if old["exit_codes"][k] != result["exit_codes"].get(k)]
    for item in changed:
        print(f"changed: {item}")
    print(f"{len(result['files'])} outputs, {len(changed)} changed")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
