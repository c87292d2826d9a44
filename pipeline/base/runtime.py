"""onnxruntime sessions at a stated optimization level and provider.

`faithful` turns every graph optimization off, so the QDQ semantics run exactly as
written; `all` is what a deployment gets (fusion into QLinearConv and friends,
whose integer kernels are not bit-identical to the QDQ semantics).

The provider "auto" asks whether torch sees a GPU; the base layer imports no torch, so
`pipeline.torch_backend` installs that question here (`install_gpu_probe`) when imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from pipeline.base.errors import EfrapError
from pipeline.base.progress import QUICK_PASS, Progress
from pipeline.base.threads import session_threads, set_session_threads

PROVIDERS = ("auto", "cpu", "cuda")

OPT_LEVELS = {
    "faithful": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# Whether torch sees a GPU (None: torch not loaded, onnxruntime's provider list decides).
_gpu_probe: Callable[[], bool] | None = None


@dataclass(frozen=True)
class Session:
    """An inference session and how it was made."""

    session: ort.InferenceSession
    provider: str
    opt_level: str
    input_name: str

    def run(self, x: np.ndarray, batch_size: int = 256, desc: str | None = None) -> np.ndarray:
        """Logits for a batch of preprocessed inputs, in chunks.

        `desc`: show the pass's progress and ETA under this name when it is long (None: silent).
        """
        bar = Progress(desc, total=len(x), min_seconds=QUICK_PASS) if desc is not None else None
        outs = []
        for i in range(0, len(x), batch_size):
            outs.append(self.session.run(None, {self.input_name: x[i : i + batch_size]})[0])
            if bar is not None:
                bar.update(len(outs[-1]))
        if bar is not None:
            bar.close(f"{len(x):,} images")
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def install_gpu_probe(probe: Callable[[], bool]) -> None:
    """Make `probe` (whether torch sees a GPU) what "auto" asks (`pipeline.torch_backend`)."""
    global _gpu_probe
    _gpu_probe = probe


def pick_provider(provider: str = "auto") -> str:
    """CUDA when requested or available (onnxruntime-gpu and a GPU), else CPU."""
    if provider not in PROVIDERS:
        raise EfrapError(f"unknown provider '{provider}': use one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if provider == "cpu":
        return "CPUExecutionProvider"
    if provider == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise EfrapError("CUDA provider requested but onnxruntime-gpu with a GPU is not available")
        return "CUDAExecutionProvider"
    # onnxruntime-gpu lists CUDA whether or not a GPU is visible (a Ray task given none):
    # auto takes it only when torch sees a device too.
    cuda = "CUDAExecutionProvider" in available and (_gpu_probe is None or _gpu_probe())
    return "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"


def set_default_threads(threads: int) -> None:
    """Threads of every session made without its own count (0: `OMP_NUM_THREADS`, else
    onnxruntime's default).

    Processes that run side by side (efrap batch --jobs) each take their share of the
    cores instead of one thread per core each. `pipeline.torch_backend.apply_threads`
    sets this together with torch's count.
    """
    set_session_threads(threads)


def default_threads() -> int:
    """Intra-op threads a session made without its own count gets (0: onnxruntime's default)."""
    return session_threads()


def make_session(
    model: onnx.ModelProto | bytes | str,
    opt_level: str = "faithful",
    provider: str = "auto",
    threads: int | None = None,
    optimized_path: str | None = None,
    config: Mapping[str, str] | None = None,
    arena: bool = True,
) -> Session:
    """Create a session.

    Args:
        model: A ModelProto, serialized bytes or a file path.
        opt_level: "faithful" (no optimization), "basic" or "all".
        provider: "auto", "cpu" or "cuda".
        threads: Intra-op and inter-op threads (None: `default_threads()`: the count set by
            `--threads`, else `OMP_NUM_THREADS`; 0: onnxruntime's default).
        optimized_path: If set, onnxruntime writes the optimized graph there.
        config: onnxruntime session config entries (`add_session_config_entry`), e.g.
            {"optimization.disable_specified_optimizers": "QDQPropagationTransformer"}.
        arena: onnxruntime's CPU memory arena. Off for sessions that run once over many
            large batches and are dropped: the arena keeps its high-water mark for the
            session's lifetime, and freed arenas are not always returned to the system.
    """
    if opt_level not in OPT_LEVELS:
        raise EfrapError(f"unknown optimization level '{opt_level}': use {', '.join(OPT_LEVELS)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = OPT_LEVELS[opt_level]
    count = default_threads() if threads is None else threads
    opts.intra_op_num_threads = count
    # Inter-op threads only run in ORT_PARALLEL mode; set alike so that a count asked
    # for is the count used whichever mode a session runs in.
    opts.inter_op_num_threads = count
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = arena
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    chosen = pick_provider(provider)
    providers = [chosen] if chosen == "CPUExecutionProvider" else [chosen, "CPUExecutionProvider"]
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    try:
        sess = ort.InferenceSession(data, sess_options=opts, providers=providers)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EfrapError(f"onnxruntime cannot load the model ({msg})") from None
    return Session(sess, sess.get_providers()[0], opt_level, sess.get_inputs()[0].name)
