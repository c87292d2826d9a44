"""Layer inputs and FP targets for learned rounding, from onnxruntime running the graph itself.

As AIMET's ONNX AdaRound samples activations, the graph is never re-implemented:
for each layer, onnxruntime runs the part of the graph the layer depends on and the
wanted tensor is exposed as an output.

- targets: the layer's output (after its fused activation) in the FP graph;
- inputs: the tensor the layer reads in the partly quantized QDQ graph, where the
  layers already rounded carry their integers and every activation quantizer is on
  (the caller builds that graph with the pipeline's own QDQ writer).

Only the subgraph that computes the wanted tensor is run (onnxruntime computes
every node of a session otherwise). Within a *lineage* (the FP graph, or the partly
quantized graphs of one run, which only ever gain rounded layers downstream of what was
asked before), every tensor computed is kept, and the next subgraph starts from the
kept tensors it reaches instead of from the graph input: a layer's input is the
previous layers' outputs run through one block, not the whole network again, so the
sampling of a deep network grows with its depth, not its square. A tensor asked for in
the partly quantized graph is upstream of the layer being rounded, so every layer it
depends on is already final when it is computed, and it stays valid for the rest of
the run. The same ops run on the same values, so the tensors are the same bytes as a
run from the input. Each onnxruntime call is sized so that its
output stays near `RUN_BYTES`, and a layer's cached rows stay in memory up to
`ram_bytes`; beyond that they spill to a file in a temporary folder and each
optimization step reads its batch's rows with positional reads, so resident memory
stays bounded by a few batches, not by the calibration count times a layer's size.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator

import numpy as np
import onnx
import torch

from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import graph_inputs
from pipeline.base.progress import QUICK_PASS, Progress
from pipeline.base.runtime import make_session

#: Target size of one onnxruntime call's output (bytes).
RUN_BYTES = 64 << 20
#: Largest cache of one tensor kept in memory; larger ones go to disk.
RAM_BYTES = 512 << 20
#: Most bytes of kept tensors in memory per lineage, and most kept tensors on disk per lineage
#: (least recently used ones go first; a tensor that is gone is computed again when needed).
KEEP_RAM_BYTES = 512 << 20
KEEP_DISK = 6


def subgraph(model: onnx.ModelProto, outputs: Iterable[str],
             available: Collection[str] = ()) -> onnx.ModelProto:
    """The smallest part of `model` that computes `outputs` from the graph input and the
    `available` float32 tensors (which become inputs where the walk back reaches them)."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    wanted = list(outputs)
    keep: set[int] = set()
    index = {id(n): i for i, n in enumerate(graph.node)}
    stack = list(wanted)
    seen: set[str] = set()
    fed: list[str] = []
    while stack:
        name = stack.pop()
        if name in seen or name in inits:
            continue
        seen.add(name)
        if name in available and name not in wanted:
            fed.append(name)
            continue
        if name not in producer:
            continue
        node = producer[name]
        keep.add(index[id(node)])
        stack.extend(i for i in node.input if i)
    nodes = [n for i, n in enumerate(graph.node) if i in keep]
    used = {i for n in nodes for i in n.input}
    inputs = [i for i in graph_inputs(model) if i.name in seen or not fed]
    inputs += [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in sorted(fed)]
    out = onnx.helper.make_graph(
        nodes, graph.name, inputs,
        [onnx.helper.make_empty_tensor_value_info(name) for name in wanted],
        [i for i in graph.initializer if i.name in used])
    sub = onnx.helper.make_model(out, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    return sub


class DiskRows:
    """Rows of a float32 N x ... array in a file, read by index with positional reads.

    Args:
        path: The file (raw float32, C order).
        shape: (N, ...) of the array.
    """

    def __init__(self, path: str, shape: tuple[int, ...]) -> None:
        self.path = path
        self.shape = shape
        self.row_bytes = int(np.prod(shape[1:])) * 4
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def device(self) -> torch.device:
        """Rows are read onto the CPU."""
        return torch.device("cpu")

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        rows = index.detach().cpu().reshape(-1).tolist()
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.float32)
        flat = out.reshape(len(rows), -1)
        for k, r in enumerate(rows):
            flat[k] = np.frombuffer(os.pread(self._fd, self.row_bytes, r * self.row_bytes), np.float32)
        return torch.from_numpy(out)

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)


Rows = torch.Tensor | DiskRows


#: A source of feed rows: (start, stop) -> float32 array of those rows.
Source = Callable[[int, int], np.ndarray]


def _counted(batches: Iterator[np.ndarray], bar: Progress) -> Iterator[np.ndarray]:
    """`batches` as they come, counted on `bar` (its ETA), which closes after the last."""
    for part in batches:
        bar.update(len(part))
        yield part
    bar.close()


def _rows_source(rows: Rows) -> Source:
    """Rows [start, stop) of a kept tensor as a numpy array."""
    if isinstance(rows, DiskRows):
        return lambda a, b: rows[torch.arange(a, b)].numpy()
    host = rows.detach().cpu().numpy()
    return lambda a, b: host[a:b]


class OrtSampler:
    """Runs (parts of) graphs over the calibration images and caches the tensors asked for.

    Args:
        images: Model-ready calibration inputs, N x ....
        device: Where in-memory caches live (the rounding device).
        provider: onnxruntime provider.
        fixed_batch: The model's fixed batch size, or None for a dynamic batch.
        ram_bytes: Largest cache kept in memory.
    """

    def __init__(self, images: np.ndarray, device: torch.device, provider: str = "auto",
                 fixed_batch: int | None = None, ram_bytes: int = RAM_BYTES) -> None:
        self.images = images
        self.device = device
        self.provider = provider
        self.fixed_batch = fixed_batch
        self.ram_bytes = ram_bytes
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._files: list[DiskRows] = []
        self._kept: dict[str, OrderedDict[str, Rows]] = {}

    def run(self, model: onnx.ModelProto, tensor: str, lineage: str | None = None) -> Rows:
        """`tensor` computed by `model` for every calibration image.

        Args:
            model: The graph.
            tensor: The float32 tensor wanted.
            lineage: Names a family of graphs whose tensors asked for so far are still
                valid in `model` (see the module docstring): they are reused as inputs,
                and `tensor` is kept for later calls. None: run from the graph input.

        Raises:
            EfrapError: onnxruntime cannot run the graph, or the tensor is not float32.
        """
        kept = self._kept.setdefault(lineage, OrderedDict()) if lineage is not None else OrderedDict()
        if tensor in kept:
            kept.move_to_end(tensor)
            return kept[tensor]
        sub = subgraph(model, [tensor], kept.keys())
        session = make_session(sub, "faithful", self.provider, arena=False)
        image_names = {i.name for i in graph_inputs(model)}
        sources: dict[str, Source] = {}
        for inp in sub.graph.input:
            if inp.name in image_names:
                sources[inp.name] = lambda a, b: self.images[a:b]
            else:
                kept.move_to_end(inp.name)
                sources[inp.name] = _rows_source(kept[inp.name])
        rows = self._collect(tensor, self._batches(session, sources))
        if lineage is not None:
            kept[tensor] = rows
            self._evict(kept)
        return rows

    def _collect(self, tensor: str, batches: Iterator[np.ndarray]) -> Rows:
        """The batches as one cache: in memory up to `ram_bytes`, else spilled to a file."""
        n = len(self.images)
        bar = Progress(f"onnxruntime: '{tensor}' for {n:,} images", total=n, min_seconds=QUICK_PASS)
        batches = _counted(batches, bar)
        first = next(batches)
        if first.dtype != np.float32:
            raise EfrapError(f"tensor '{tensor}' is {first.dtype}, not float32")
        row_shape = first.shape[1:]
        if int(np.prod(row_shape)) * 4 * n <= self.ram_bytes:
            out = np.empty((n, *row_shape), np.float32)
            start = 0
            for part in itertools.chain([first], batches):
                out[start : start + len(part)] = part
                start += len(part)
            return torch.from_numpy(out).to(self.device)
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="efrap-cache-")
        path = os.path.join(self._tmp.name, f"rows-{len(self._files)}.f32")
        # Plain writes, not a memory map: written pages do not stay in this process's memory.
        # One batch at a time (chain, not `(first, *batches)`, which would hold them all).
        with open(path, "wb") as fh:
            for part in itertools.chain([first], batches):
                fh.write(np.ascontiguousarray(part, dtype=np.float32).data)
        rows = DiskRows(path, (n, *row_shape))
        self._files.append(rows)
        return rows

    def _evict(self, kept: OrderedDict[str, Rows]) -> None:
        """Drop the least recently used kept tensors past the budgets (never the newest).

        A dropped file stays open until `close`: the caller may still read the rows it was given.
        """
        names = list(kept)[:-1]
        ram = sum(r.numel() * 4 for r in kept.values() if isinstance(r, torch.Tensor))
        disk = sum(isinstance(r, DiskRows) for r in kept.values())
        for name in names:
            rows = kept[name]
            if isinstance(rows, torch.Tensor) and ram > KEEP_RAM_BYTES:
                ram -= rows.numel() * 4
                del kept[name]
            elif isinstance(rows, DiskRows) and disk > KEEP_DISK:
                disk -= 1
                del kept[name]

    def _batches(self, session: object, sources: dict[str, Source] | None = None) -> Iterator[np.ndarray]:
        """The output for the images, batch by batch (the first batch sizes the rest).

        `sources` gives each session input's rows (default: the images as its one input).
        """
        run = session.session.run  # type: ignore[attr-defined]
        if sources is None:
            sources = {session.input_name: lambda a, b: self.images[a:b]}  # type: ignore[attr-defined]
        n = len(self.images)
        fixed = self.fixed_batch
        start, batch = 0, fixed or 1
        while start < n:
            stop = min(start + batch, n)
            feeds = {name: src(start, stop) for name, src in sources.items()}
            if fixed is not None and stop - start < fixed:
                # A fixed-batch model cannot take a short last batch: pad it with the first rows.
                pad = fixed - (stop - start)
                feeds = {name: np.concatenate([f, sources[name](0, pad)]) for name, f in feeds.items()}
            part = run(None, feeds)[0][: stop - start]
            yield part
            if start == 0 and fixed is None:
                batch = int(max(1, min(256, RUN_BYTES // max(part[0].nbytes, 1))))
            start = stop

    def close(self) -> None:
        """Remove the spilled caches."""
        for rows in self._files:
            rows.close()
        self._files = []
        self._kept = {}
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
