"""Batches: many models through scan, defend (or quantize) and verify, on one machine or a Ray cluster.

`load_manifest` reads and checks a manifest (pipeline.batch.manifest); `run_local` runs
it on this machine with `jobs` models side by side (pipeline.batch.local); `run_ray`
runs it as Ray tasks (pipeline.batch.ray_runner, Ray being an optional extra);
`run_job` is one model's run (pipeline.batch.job). Both runners skip the models whose
result is stored for the same model file and settings (pipeline.batch.store) and
write results.csv, results.json and index.html (pipeline.batch.report).
"""

from pipeline.batch.job import run_job
from pipeline.batch.local import run_local
from pipeline.batch.manifest import Manifest, ModelJob, load_manifest, result_key
from pipeline.batch.ray_runner import run_ray
from pipeline.batch.report import BatchRun, text_table

__all__ = [
    "BatchRun",
    "Manifest",
    "ModelJob",
    "load_manifest",
    "result_key",
    "run_job",
    "run_local",
    "run_ray",
    "text_table",
]
