"""A conv layer's reconstruction over sampled (image, position) rows.

The release's reconstruction loss is the channel-summed squared error of the layer's
output, averaged over images *and* output positions. A conv's output at one position
depends only on the input patch under its kernel there, so that average is an average
over (image, position) rows, and the fused Relu/Clip and the output quantizer act on
each row alone. A step over whole images pays for every position of every image in its
batch: a 3x3 conv at 32 x 32 reads 1,024 patches per image, one at 4 x 4 reads 16, and
the same 32-image batch costs the first layer 64 times what it costs the last.

Here the problem is rewritten once per layer over a fixed pool of rows drawn from
every calibration image (the same number from each, positions drawn without
replacement): each row is the input patch, flattened as the weight is ([K, 1, 1] with
K = C_in * k_h * k_w), and the FP output at that position ([C_out, 1, 1]). The layer
then runs as a 1 x 1 conv with the same groups on the patches, so a step over B rows
costs B * weights multiply-adds whatever the image size, and rows of many images
decorrelate the step's estimate. The objective is the same quantity, estimated on the
pool; with as many rows as the images have positions, it is the whole-cache loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx
import torch
import torch.nn.functional as F

from pipeline.base.errors import EfrapError
from pipeline.rounding.base import LayerProblem, Rows

#: Bytes of unfolded patches per chunk while the pool is built.
UNFOLD_BYTES = 128 << 20


def conv_attrs(node: onnx.NodeProto) -> dict:
    """The node's attributes as plain values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def explicit_pads(attrs: dict, size: tuple[int, int], kernel: tuple[int, int]) -> list[int]:
    """(top, left, bottom, right) pads of a 2-D conv, auto_pad resolved as ONNX defines it."""
    mode = attrs.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode in ("NOTSET", ""):
        return list(attrs.get("pads", [0, 0, 0, 0]))
    if mode == "VALID":
        return [0, 0, 0, 0]
    strides = list(attrs.get("strides", [1, 1]))
    dilations = list(attrs.get("dilations", [1, 1]))
    begin, end = [], []
    for s, k, st, d in zip(size, kernel, strides, dilations, strict=True):
        total = max((-(-s // st) - 1) * st + (k - 1) * d + 1 - s, 0)
        small, large = total // 2, total - total // 2
        begin.append(large if mode == "SAME_LOWER" else small)
        end.append(small if mode == "SAME_LOWER" else large)
    return begin + end


def patches(x: torch.Tensor, attrs: dict, kernel: tuple[int, int]) -> torch.Tensor:
    """[N, K, L]: every input patch of a 2-D conv (K = C_in * k_h * k_w, L output positions)."""
    top, left, bottom, right = explicit_pads(attrs, (x.shape[2], x.shape[3]), kernel)
    x = F.pad(x, [left, right, top, bottom])
    return F.unfold(x, kernel, dilation=tuple(attrs.get("dilations", [1, 1])),
                    stride=tuple(attrs.get("strides", [1, 1])))


def draw_positions(images: int, positions: int, rows: int, seed: int) -> torch.Tensor:
    """[N, m] positions per image, m = min(positions, ceil(rows / N)), without replacement."""
    per = min(positions, max(1, math.ceil(rows / images)))
    gen = torch.Generator()
    gen.manual_seed(seed)
    # Sorted within an image, so each chunk gathers in memory order.
    return torch.stack([torch.randperm(positions, generator=gen)[:per].sort().values
                        for _ in range(images)])


def build_pool(inputs: Rows, targets: Rows, attrs: dict, kernel: tuple[int, int], rows: int, seed: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool: patches [M, K, 1, 1] and FP outputs [M, C_out, 1, 1], image by image.

    Raises:
        EfrapError: the targets' positions do not match the conv's output positions.
    """
    n = len(inputs)
    first = inputs[torch.arange(1)]
    k = int(first.shape[1]) * kernel[0] * kernel[1]
    cols = patches(first.to(torch.float32), attrs, kernel).shape[2]
    sample = targets[torch.arange(1)]
    if int(math.prod(sample.shape[2:])) != cols:
        raise EfrapError(f"conv output has {math.prod(sample.shape[2:])} positions, its patches {cols}")
    chosen = draw_positions(n, cols, rows, seed)
    chunk = int(max(1, UNFOLD_BYTES // max(k * cols * 4, 1)))
    xs, ys = [], []
    for i in range(0, n, chunk):
        idx = torch.arange(i, min(i + chunk, n))
        pos = chosen[idx]
        cols_x = patches(inputs[idx].to(torch.float32), attrs, kernel)              # [n, K, L]
        gx = torch.gather(cols_x, 2, pos[:, None, :].expand(-1, k, -1).to(cols_x.device))
        xs.append(gx.permute(0, 2, 1).reshape(-1, k).to(device))
        y = targets[idx].to(torch.float32)
        y = y.reshape(y.shape[0], y.shape[1], -1)
        gy = torch.gather(y, 2, pos[:, None, :].expand(-1, y.shape[1], -1).to(y.device))
        ys.append(gy.permute(0, 2, 1).reshape(-1, y.shape[1]).to(device))
    return torch.cat(xs)[:, :, None, None], torch.cat(ys)[:, :, None, None]


def patch_forward(forward: Callable[..., torch.Tensor], weight_shape: torch.Size
                  ) -> Callable[..., torch.Tensor]:
    """The layer's forward on patches: its weight as a 1 x 1 conv over [M, K, 1, 1] rows."""
    flat = (int(weight_shape[0]), int(math.prod(weight_shape[1:])), 1, 1)

    def run(x: torch.Tensor, w: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        return forward(x, w.reshape(flat), out_scale)

    return run


def position_problem(problem: LayerProblem, node: onnx.NodeProto,
                     patch_graph_forward: Callable[..., torch.Tensor], rows: int, seed: int) -> LayerProblem:
    """The layer's problem over a pool of about `rows` sampled (image, position) rows.

    Args:
        problem: The problem over whole images (its inputs and targets are read once).
        node: The layer's Conv node (2-D).
        patch_graph_forward: The layer's nodes with the Conv rewritten as a 1 x 1 conv
            (`pipeline.reconstruct.layer_forward(..., patches=True)`).
        rows: Pool size to aim for (every image gives the same number of rows).
        seed: Seeds which positions are drawn.
    """
    assert problem.inputs is not None and problem.targets is not None
    attrs = conv_attrs(node)
    kernel = (int(problem.weight.shape[2]), int(problem.weight.shape[3]))
    x, y = build_pool(problem.inputs, problem.targets, attrs, kernel, rows, seed, problem.weight.device)
    return LayerProblem(
        name=problem.name, weight=problem.weight, qparams=problem.qparams,
        forward=patch_forward(patch_graph_forward, problem.weight.shape), inputs=x, targets=y,
        channel_axis=problem.channel_axis, error_scale=problem.error_scale, seed=problem.seed,
        output_qparams=problem.output_qparams,
    )
