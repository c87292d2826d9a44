"""The reconstruction driver feeds each layer what the deployed model computes."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from converters.qdq import to_qdq
from pipeline.base.deployment import Deployment
from pipeline.base.runtime import make_session
from pipeline.base.scheme import PRESETS
from pipeline.prepare import prepare_model
from pipeline.quantize import QuantizeOptions, quantize_model
from pipeline.quantized import QuantResult
from pipeline.reconstruct import Head, build_problem
from pipeline.rounding.efrap import EFRAP_DEFAULT
from pipeline.sampler import DiskRows, OrtSampler, subgraph


def _ort_tensor(qdq: onnx.ModelProto, name: str, images: np.ndarray) -> np.ndarray:
    model = onnx.ModelProto.FromString(qdq.SerializeToString())
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = make_session(model, "faithful", "cpu")
    return sess.session.run([name], {"input": images})[0]


def test_cached_inputs_are_what_the_deployed_layer_reads(tiny_model: onnx.ModelProto,
                                                         calib_images: np.ndarray) -> None:
    qdq, result, _ = quantize_model(tiny_model, calib_images,
                                    QuantizeOptions(Deployment(scheme=PRESETS["w4a4"])))
    prepared = prepare_model(tiny_model)
    sampler = OrtSampler(calib_images, torch.device("cpu"), "cpu")
    for k, layer in enumerate(result.plan.layers):
        done = {lay.node: result.layers[lay.node] for lay in result.plan.layers[:k]}
        partial = to_qdq(prepared, QuantResult(result.plan, result.act_qparams, done))
        consumer = next(n for n in partial.graph.node if n.name == layer.node)
        inputs = sampler.run(partial, consumer.input[0])
        # What the deployed model's layer reads: the dequantized (and grid-clipped) tensor.
        final = next(n for n in qdq.graph.node if n.name == layer.node)
        np.testing.assert_array_equal(inputs.numpy(), _ort_tensor(qdq, final.input[0], calib_images))
        ql = result.layers[layer.node]
        bias = ql.dequantized_bias()
        targets = sampler.run(prepared, layer.output)
        init = next(i for i in prepared.graph.initializer if i.name == layer.weight)
        weight = torch.from_numpy(np.array(onnx.numpy_helper.to_array(init)))
        problem = build_problem(prepared, layer, weight,
                                ql.qparams, None if bias is None else torch.from_numpy(bias),
                                result.act_qparams.get(layer.output), inputs, targets)
        # The layer's forward with its integer weight gives the deployed output point.
        with torch.no_grad():
            out = problem.forward(inputs, torch.from_numpy(ql.dequantized_weight())).numpy()
        if layer.output in result.act_qparams:
            names = {o for n in qdq.graph.node for o in n.output}
            clipped = f"{layer.output}_dequantized_clipped"
            deployed = _ort_tensor(qdq, clipped if clipped in names else f"{layer.output}_dequantized",
                                   calib_images)
            steps = np.abs(out - deployed) / float(result.act_qparams[layer.output].scale)
            assert (steps > 0.5).mean() < 1e-3
        assert out.shape == targets.shape


def test_spilled_rows_equal_rows_in_memory(tiny_model: onnx.ModelProto, calib_images: np.ndarray) -> None:
    prepared = prepare_model(tiny_model)
    name = prepared.graph.node[3].output[0]
    in_ram = OrtSampler(calib_images, torch.device("cpu"), "cpu").run(prepared, name)
    spill = OrtSampler(calib_images, torch.device("cpu"), "cpu", ram_bytes=0)
    on_disk = spill.run(prepared, name)
    assert isinstance(on_disk, DiskRows) and len(on_disk) == len(calib_images)
    idx = torch.tensor([5, 0, 255, 17])
    assert torch.equal(on_disk[idx], in_ram[idx])
    spill.close()


def test_caching_holds_one_batch_at_a_time(tiny_model: onnx.ModelProto, calib_images: np.ndarray) -> None:
    # A layer cache spilled to disk must not hold every onnxruntime batch in memory before
    # writing (a ResNet-50 stem's outputs for 1,024 images are 3.3 GB).
    prepared = prepare_model(tiny_model)
    name = prepared.graph.node[3].output[0]
    for ram_bytes in (0, 1 << 30):
        sampler = OrtSampler(calib_images[:40], torch.device("cpu"), "cpu", fixed_batch=4,
                             ram_bytes=ram_bytes)
        produce = sampler._batches
        alive: list[int] = []

        def watched(*args: object, produce=produce, alive=alive) -> Iterator[np.ndarray]:
            refs: list[weakref.ref] = []
            for part in produce(*args):
                alive.append(sum(r() is not None for r in refs))
                refs.append(weakref.ref(part))
                yield part

        sampler._batches = watched  # type: ignore[method-assign]
        rows = sampler.run(prepared, name)
        assert len(rows) == 40 and len(alive) == 10
        # The first batch (kept to size the cache) and the one being written, never more.
        assert max(alive) <= 2, alive
        sampler.close()


def test_fixed_batch_models_are_run_one_batch_at_a_time(tiny_model: onnx.ModelProto,
                                                       calib_images: np.ndarray) -> None:
    prepared = prepare_model(tiny_model)
    name = prepared.graph.output[0].name
    fixed = OrtSampler(calib_images[:10], torch.device("cpu"), "cpu", fixed_batch=4).run(prepared, name)
    free = OrtSampler(calib_images[:10], torch.device("cpu"), "cpu").run(prepared, name)
    np.testing.assert_allclose(fixed.numpy(), free.numpy(), atol=1e-6)


def test_subgraph_keeps_only_what_the_output_needs(tiny_model: onnx.ModelProto) -> None:
    prepared = prepare_model(tiny_model)
    first_conv = prepared.graph.node[0].output[0]
    sub = subgraph(prepared, [first_conv])
    assert [n.op_type for n in sub.graph.node] == ["Conv"]
    out = make_session(sub, "faithful", "cpu").run(np.zeros((2, 1, 28, 28), np.float32))
    assert out.shape == (2, 8, 28, 28)


def test_fisher_and_head_fields(tiny_model: onnx.ModelProto, calib_images: np.ndarray) -> None:
    _, result, _ = quantize_model(tiny_model, calib_images,
                                  QuantizeOptions(Deployment(scheme=PRESETS["w8a8"])))
    prepared = prepare_model(tiny_model)
    images = calib_images[:64]
    sampler = OrtSampler(images, torch.device("cpu"), "cpu")
    head = Head(prepared, sampler.run(prepared, prepared.graph.output[0].name), torch.device("cpu"), "pd")
    layer = result.plan.layers[2]
    ql = result.layers[layer.node]
    targets = sampler.run(prepared, layer.output)
    weight = torch.from_numpy(ql.dequantized_weight())
    problem = build_problem(prepared, layer, weight, ql.qparams, None, None, targets, targets, head,
                            needs=frozenset({"output_grads", "head"}))
    assert problem.output_grads is not None and problem.output_grads.shape == targets.shape
    assert problem.head is not None and problem.head_targets is not None
    with torch.no_grad():
        logits = problem.head(targets)
    np.testing.assert_allclose(logits.numpy(), problem.head_targets.numpy(), atol=1e-4)


def test_kept_tensors_start_later_subgraphs_and_give_the_same_bytes(tiny_model: onnx.ModelProto,
                                                                     calib_images: np.ndarray) -> None:
    prepared = prepare_model(tiny_model)
    plan = quantize_model(tiny_model, calib_images[:32],
                          QuantizeOptions(Deployment(scheme=PRESETS["w8a8"])))[1].plan
    kept = OrtSampler(calib_images[:40], torch.device("cpu"), "cpu", ram_bytes=30_000)  # some spill to disk
    fresh = OrtSampler(calib_images[:40], torch.device("cpu"), "cpu")
    for layer in plan.layers:
        again = kept.run(prepared, layer.output, lineage="fp")
        whole = fresh.run(prepared, layer.output)
        np.testing.assert_array_equal(again[torch.arange(40)].numpy(), whole.numpy())
    # The last layer's output is computed from the one before it, not from the image.
    before, last = plan.layers[-2], plan.layers[-1]
    sub = subgraph(prepared, [last.output], [before.output])
    assert [i.name for i in sub.graph.input] == [before.output]
    assert kept.run(prepared, last.output, lineage="fp") is kept.run(prepared, last.output, lineage="fp")
    kept.close()
    fresh.close()


def test_learned_rounding_is_the_same_with_kept_tensors(tiny_model: onnx.ModelProto, calib_images: np.ndarray,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    options = QuantizeOptions(Deployment(scheme=PRESETS["w4a4"]), method="efrap",
                              rounding=replace(EFRAP_DEFAULT, iters=15, batch_size=8))
    with_kept, _, _ = quantize_model(tiny_model, calib_images[:64], options)
    run = OrtSampler.run

    def from_input(self: OrtSampler, model: onnx.ModelProto, tensor: str, lineage: str | None = None):
        return run(self, model, tensor)

    monkeypatch.setattr(OrtSampler, "run", from_input)
    without, _, _ = quantize_model(tiny_model, calib_images[:64], options)
    assert with_kept.SerializeToString() == without.SerializeToString()
