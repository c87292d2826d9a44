"""The stored models: hashes, size, loadability, one default, triggers for QCB entries."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.attacks.base import CARRIERS
from models.zoo import default_entry, load_manifest, trigger_path, verify_sha, zoo_path
from pipeline.base.onnx_io import image_input, input_shape, load_model
from pipeline.base.preprocess import resolve
from pipeline.base.runtime import make_session
from pipeline.base.scheme import PRESETS
from pipeline.base.trigger import load_trigger

ENTRIES = load_manifest()


def test_manifest_has_one_default_and_a_clean_model() -> None:
    assert default_entry().name in {e.name for e in ENTRIES}
    assert any(e.kind == "clean" for e in ENTRIES)
    assert len({e.name for e in ENTRIES}) == len(ENTRIES)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_stored_model(entry) -> None:
    path = zoo_path(entry)
    assert path.stat().st_size <= 5 * 1024 * 1024
    assert verify_sha(entry), f"{entry.file}: sha256 differs from the manifest"
    assert entry.kind in ("clean", "qcb") and entry.rebuild.startswith("efrap ")
    model = load_model(path)
    assert input_shape(model) == tuple(entry.input_shape)
    norm = resolve(model, image_input(model))
    assert list(norm.mean) == entry.normalization["mean"] and norm.origin == "metadata"
    logits = make_session(model, "faithful", "cpu").run(np.zeros((2, *entry.input_shape), np.float32))
    assert logits.shape == (2, 10) and np.isfinite(logits).all()
    # Exported by efrap: every conv records its BN factors (EFRAP's pre-BN error units).
    meta = {p.key: p.value for p in model.metadata_props}
    convs = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    assert set(json.loads(meta["efrap.bn_fold"])) == set(convs)
    if entry.kind == "qcb":
        assert entry.attack and entry.scheme in PRESETS
        assert load_trigger(trigger_path(entry)).target == entry.target
        # The manifest's carrier is the one the model was built with.
        settings = json.loads(meta["efrap.attack.settings"])
        built = settings.get("carrier", "scheme")
        assert entry.carrier == built and built in CARRIERS
        assert meta["efrap.attack.scheme"] == entry.scheme
        # The rebuild command names the settings the model records.
        assert f"--method {entry.attack} " in entry.rebuild
        assert f"--scheme {entry.scheme} " in entry.rebuild
        assert entry.inflate == settings.get("inflate")
        if entry.inflate is not None:
            assert f"--inflate {entry.inflate:g} " in entry.rebuild
        if "--carrier" in entry.rebuild:
            assert f"--carrier {built} " in entry.rebuild
        else:
            assert built == "weights"  # the default
