"""The default gates are a promise: on the example two-tower and ranker, at every precision, a faithful bundle
passes and a bundle whose export had one layer's weights scaled by 1.05 fails. The layers are the ones whose
scaling moves the outputs least (measured: a cross layer's, rel L2 7.1e-3 and 9.9e-3 under FP16). FP32 and
FP16 output gates catch it by themselves; under INT8's own error only the weights gate can."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from toolkit.commands.build import build_bundle
from toolkit.commands.export import export_model
from toolkit.commands.verify import verify
from toolkit.evaluate.verify import VerifyOptions
from toolkit.example.train import ensure_examples
from toolkit.model.loading import load_model

SCALED = {"two_tower": ("query", "interaction.cross.layers.1.linear.weight"),
          "ranker": ("ranker", "interaction.cross.layers.0.down.weight")}  # fmt: skip
PRECISIONS = ("fp32", "fp16", "int8")


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """The example models, trained as `dcnc run` trains them, and their towers exported."""
    root = tmp_path_factory.mktemp("examples")
    trained = ensure_examples(root / "train", families=("retrieval", "ranking"), quiet=True)
    exported = {}
    for family, model in (("retrieval", "two_tower"), ("ranking", "ranker")):
        checkpoint = trained[family]["checkpoint"]
        folder = root / model / "onnx"
        loaded = load_model(checkpoint)
        export_model(loaded, folder if len(loaded.towers) > 1 else folder / f"{model}.onnx", validate=False,
                     passes="default")  # as `dcnc export` and `dcnc run` export
        exported[model] = (checkpoint, folder, loaded.calibration)
    return root, exported


def scaled_export(folder, tower: str, weight: str, out):
    shutil.copytree(folder, out)
    model = onnx.load(str(out / f"{tower}.onnx"))
    (init,) = [i for i in model.graph.initializer if i.name == weight]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.05), init.name))
    onnx.save(model, str(out / f"{tower}.onnx"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("model", sorted(SCALED))
def test_a_faithful_bundle_passes_and_one_with_a_layer_scaled_by_5_percent_fails(examples, model, precision):
    root, exported = examples
    checkpoint, folder, calibration = exported[model]
    tower, weight = SCALED[model]
    calib = calibration if precision != "fp32" else None
    options = VerifyOptions(latency=False)
    outcomes = {}
    for name, source in (("faithful", folder), ("scaled", scaled_export(folder, tower, weight, root / f"{model}-{precision}-x"))):
        bundle = root / f"{model}-{precision}-{name}"
        build_bundle(source, bundle, precision=precision, calib=calib, force=True)
        outcomes[name] = verify(checkpoint, bundle, options=options, branches=False)
    assert outcomes["faithful"].passed, [(g.name, g.value, g.threshold) for g in outcomes["faithful"].failed_gates]
    failed = {g.name for g in outcomes["scaled"].failed_gates}
    assert f"weights.{tower}.mismatched" in failed
    if precision != "int8":
        assert failed - {f"weights.{tower}.mismatched"}, "the output gates alone must catch it"
