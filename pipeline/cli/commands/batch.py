"""`efrap batch`: many models through scan, defend (or quantize) and verify, from a manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.base.errors import EfrapError
from pipeline.base.threads import env_threads, thread_count
from pipeline.batch import load_manifest, run_local, run_ray, text_table
from pipeline.cli.args import positive_int


def run(args: argparse.Namespace) -> int:
    """Run the manifest's models; exit 1 when a model failed, or broke its check or gate."""
    # The whole manifest is checked before anything is written.
    manifest = load_manifest(args.manifest)
    out = args.out or f"batch-{Path(args.manifest).stem}"
    if args.ray is not None:
        if args.jobs is not None:
            raise EfrapError("--jobs runs models side by side on this machine; with --ray, Ray schedules "
                             "them (--threads sets each task's CPUs)")
        result = run_ray(manifest, out, args.ray, threads=args.threads or env_threads() or 1,
                         retry_failed=args.retry_failed)
    else:
        result = run_local(manifest, out, jobs=args.jobs or 1, threads=args.threads,
                           retry_failed=args.retry_failed)
    print(text_table(result))
    print(f"{len(result.computed)} computed, {len(result.skipped)} skipped ({result.runner}, "
          f"{result.seconds:.1f}s); {out}/index.html, results.csv, results.json")
    return result.exit_code


def register(sub: argparse._SubParsersAction) -> None:
    """Add `efrap batch`."""
    p = sub.add_parser(
        "batch", help="run a manifest of models through scan, defend/quantize and verify",
        description="Each model of the manifest (TOML or JSON: a [defaults] table and [[model]] "
        "tables; docs/BATCH.md) runs through the scan, defend (EFRAP) or quantize "
        "(another method) and verify, into its own folder under --out. A failing model is recorded "
        "and the others go on; a re-run skips every model whose result exists for the same model "
        "file (sha256) and settings, so a killed run resumes. Writes results.csv, results.json and "
        "index.html. Exit 0 when every model ran and passed, 1 otherwise, 2 for a bad manifest.")
    p.add_argument("manifest", help="the manifest (.toml or .json)")
    p.add_argument("--out", help="output folder (default batch-<manifest name>); an existing one is resumed")
    p.add_argument("--jobs", type=positive_int, default=None,
                   help="models run side by side on this machine, each in its own process (default 1)")
    p.add_argument("--threads", type=thread_count, default=None,
                   help="torch and onnxruntime threads per model (default: OMP_NUM_THREADS if set, else "
                   "cores // jobs; with --ray, 1: the CPUs each task asks for)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run as Ray tasks: 'auto' (the running cluster), 'local' (start Ray on this "
                   "machine) or an address (ray://host:10001); needs Ray: pip install 'ray>=2.60'")
    p.add_argument("--retry-failed", action="store_true",
                   help="run again the models whose stored result failed (default: skip them too)")
    p.set_defaults(func=run)
