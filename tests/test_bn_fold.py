"""BN factors of folded convs: recorded at export, read back, and used for EFRAP's errors."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from converters.export import export_onnx
from models.architectures import build_model
from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import get_metadata, set_metadata
from pipeline.bn_fold import BN_FOLD_KEY, pre_bn_error_scale, read_bn_factors
from pipeline.qmath import QParams
from pipeline.rounding import LayerProblem, get_method
from pipeline.rounding.efrap import EFRAP_RELEASE, Efrap, error_weights, flip_targets
from pipeline.rounding.learned import LayerGrid


def _bn_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("small_cnn", 1, 10, 0.25, 28)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.2, 3.0)
                m.weight.uniform_(-2.0, 2.0)  # negative gammas mirror the channel's grid
    return model.eval()


def test_export_records_each_conv_bn_factor(tmp_path: Path) -> None:
    model = _bn_model()
    out = tmp_path / "m.onnx"
    export_onnx(model, (1, 28, 28), str(out), normalization=([0.0], [1.0]))
    proto = onnx.load(str(out))
    recorded = json.loads(get_metadata(proto)[BN_FOLD_KEY])
    convs = [n.name for n in proto.graph.node if n.op_type == "Conv"]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert list(recorded) == sorted(convs) and len(convs) == len(bns)
    by_order = [recorded[name] for name in convs]  # graph order is module order here
    for got, bn in zip(by_order, bns, strict=True):
        want = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
        np.testing.assert_array_equal(np.asarray(got, np.float32), want.astype(np.float32))


def _mirror(qp: QParams, f: np.ndarray) -> QParams:
    """The grid folding by f gives: scale |f| s, zero point mirrored where f < 0."""
    z = np.where(f < 0, qp.qmin + qp.qmax - qp.zero_point, qp.zero_point).astype(np.int64)
    return QParams(scale=(qp.scale * np.abs(f)).astype(np.float32), zero_point=z,
                   qmin=qp.qmin, qmax=qp.qmax, axis=qp.axis)


def test_pre_bn_errors_equal_the_unfolded_weight_errors() -> None:
    gen = torch.Generator().manual_seed(5)
    raw = torch.randn(6, 3, 3, 3, generator=gen) * 0.3
    f = np.array([0.4, 1.7, -0.9, 3.2, -2.5, 1.0], np.float32)
    # An asymmetric per-channel 4-bit grid on the raw weight, and the same grid folded.
    lo, hi = raw.flatten(1).min(1).values.numpy(), raw.flatten(1).max(1).values.numpy()
    scale = ((hi - lo) / 15).astype(np.float32)
    zp = np.round(-lo / scale).astype(np.int64)
    qp_raw = QParams(scale=scale, zero_point=zp, qmin=0, qmax=15, axis=0)
    folded = raw * torch.from_numpy(f).view(-1, 1, 1, 1)
    g_raw = LayerGrid.build(raw, qp_raw)
    g_fold = LayerGrid.build(folded, _mirror(qp_raw, f))

    e_raw = error_weights(g_raw, "element", 0)
    e_exported = error_weights(g_fold, "element", 0)
    e_pre_bn = error_weights(g_fold, "element", 0, torch.from_numpy(pre_bn_error_scale(f)))
    torch.testing.assert_close(e_pre_bn, e_raw, rtol=1e-4, atol=1e-6)
    # Without the factors the folded errors are |f| times the release's.
    assert not torch.allclose(e_exported, e_raw, rtol=1e-2)
    # Flip targets: the same weights flip, mirrored where f < 0 (away from nearest either way).
    clear = (g_raw.frac - 0.5).abs() > 1e-3
    t_raw, t_fold = flip_targets(g_raw), flip_targets(g_fold)
    neg = torch.from_numpy(f < 0).view(-1, 1, 1, 1).expand_as(t_raw)
    expected = torch.where(neg, 1.0 - t_raw, t_raw)
    assert torch.equal(t_fold[clear], expected[clear])


def _problem(scale: torch.Tensor | None) -> LayerProblem:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(4, 2, 3, 3, generator=gen) * 0.2
    x = torch.randn(16, 2, 5, 5, generator=gen)
    qp = QParams(scale=np.full(4, 0.05, np.float32), zero_point=np.full(4, 8, np.int64),
                 qmin=0, qmax=15, axis=0)

    def conv(inp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(inp, weight, padding=1)

    return LayerProblem("conv", w, qp, conv, x, conv(x, w), error_scale=scale)


def test_efrap_penalty_uses_the_scale_only_in_pre_bn_units() -> None:
    scale = torch.tensor([0.5, 2.0, 1.0, 0.25])
    grid = LayerGrid.build(_problem(None).weight, _problem(None).qparams)
    v = torch.logit(grid.frac.clamp(1e-4, 1 - 1e-4))
    h = torch.sigmoid(v)
    plain = Efrap().penalty(grid, _problem(None), EFRAP_RELEASE)
    scaled = Efrap().penalty(grid, _problem(scale), EFRAP_RELEASE)
    ignored = Efrap().penalty(grid, _problem(scale), replace(EFRAP_RELEASE, error_units="exported"))
    assert plain is not None and scaled is not None and ignored is not None
    bce = F.binary_cross_entropy_with_logits(v, flip_targets(grid), reduction="none")
    e = grid.truncation_error()
    torch.testing.assert_close(scaled(v, h), (bce * e * scale.view(-1, 1, 1, 1)).sum())
    torch.testing.assert_close(ignored(v, h), plain(v, h))
    assert not torch.isclose(scaled(v, h), plain(v, h))


def test_efrap_rejects_a_scale_of_the_wrong_length() -> None:
    config = replace(EFRAP_RELEASE, iters=1)
    with pytest.raises(EfrapError, match="error_scale has 3 values for 4 output channels"):
        get_method("efrap")(_problem(torch.ones(3)), config)
    with pytest.raises(EfrapError, match="error_units"):
        get_method("efrap")(_problem(None), replace(config, error_units="raw"))


def test_zero_factor_gives_zero_scale() -> None:
    np.testing.assert_array_equal(pre_bn_error_scale(np.array([0.0, -4.0, 0.5], np.float32)),
                                  np.array([0.0, 0.25, 2.0], np.float32))


@pytest.mark.parametrize(("entry", "message"), [
    ("{", "is not valid JSON"),
    ("[1, 2]", "must map conv node names"),
    ('{"/nope/Conv": [1.0]}', "names '/nope/Conv', which is not a conv with a constant weight"),
    ('{"c": [1.0, NaN]}', "for 'c' is not a list of finite numbers"),
    ('{"c": [1.0, "x"]}', "for 'c' is not a list of finite numbers"),
    ('{"c": [1.0]}', "for 'c' has 1 factors for 2 output channels"),
])
def test_bad_metadata_is_a_clear_error(entry: str, message: str) -> None:
    proto = onnx.ModelProto()
    set_metadata(proto, {BN_FOLD_KEY: entry})
    with pytest.raises(EfrapError, match=re.escape("m.onnx: metadata 'efrap.bn_fold'")) as err:
        read_bn_factors(proto, {"c": 2}, "m.onnx")
    assert message in str(err.value)


def test_missing_entry_means_no_factors() -> None:
    assert read_bn_factors(onnx.ModelProto(), {"c": 2}) == {}
