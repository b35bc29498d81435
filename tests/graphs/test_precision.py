"""FP16 / BF16 lowering and half-precision emulation: a tower whose cross activations overflow FP16."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from tower_graphs import cosine_min, module_graph, run, zoo_feeds, zoo_graph

from calibration.cache import calibrated_ranges
from graphs.branches import analyze
from graphs.emulation import emulate_half, half_type_of, run_emulated
from graphs.precision import lower_half
from toolkit.core.errors import DcncError
from toolkit.core.signature import random_inputs
from toolkit.model.spec import CrossSpec, DenseFeature, TowerSpec
from toolkit.model.zoo.families import RetrievalTower

INPUT_SCALE = 3.0


@functools.cache
def overflow_tower() -> RetrievalTower:
    """A retrieval tower (x0 24 wide, 3 full-rank cross layers) whose cross weights are scaled so the last cross
    layer reaches ~2.5e5 on inputs of std 3: past FP16's 65504, while the embedding stays L2-normalised."""
    torch.manual_seed(0)
    tower = RetrievalTower(
        TowerSpec(dense=[DenseFeature("x", 24)], cross=CrossSpec(kind="full", layers=3), deep=[32, 16], head=[16], out_dim=8)
    ).eval()
    with torch.no_grad():
        for layer in tower.interaction.cross.layers:
            layer.linear.weight.mul_(10.0)
    return tower


def overflow_feeds(seed: int, batch: int = 64) -> dict[str, np.ndarray]:
    feeds = random_inputs(overflow_tower().input_specs, batch, seed)
    feeds["x"] *= INPUT_SCALE
    return feeds


def overflow_graph() -> onnx.ModelProto:
    return module_graph(overflow_tower(), "overflow")


def peaks(model: onnx.ModelProto, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Max |x| of every float tensor over the batches, as `dcnc build` measures it before half lowering."""
    return calibrated_ranges(model, batches)[0].peaks()


CALIBRATION = [overflow_feeds(seed) for seed in (1, 2)]


def naive_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True)


def test_the_test_tower_overflows_fp16_in_its_cross_layers():
    ranges = peaks(overflow_graph(), CALIBRATION)
    cross_output = analyze(overflow_graph()).cross_outputs[0]
    assert ranges[cross_output] > 65504


def test_ort_cpu_hides_the_overflow_of_a_naive_fp16_graph():
    feeds = overflow_feeds(9)
    reference = run(overflow_graph(), feeds)["embedding"]
    assert cosine_min(reference, run(naive_fp16(overflow_graph()), feeds)["embedding"]) > 0.999


def test_naive_fp16_conversion_fails_under_emulation():
    feeds = overflow_feeds(9)
    reference = run(overflow_graph(), feeds)["embedding"]
    emulated = run_emulated(naive_fp16(overflow_graph()), feeds)["embedding"]
    assert not np.isfinite(emulated).all() or cosine_min(reference, emulated) < 0.99


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_calibrated_lowering_keeps_cosine_above_0_999_under_emulation(dtype):
    feeds = overflow_feeds(9)
    lowered, record = lower_half(overflow_graph(), dtype, peaks(overflow_graph(), CALIBRATION))
    reference = run(overflow_graph(), feeds)["embedding"]
    assert cosine_min(reference, run_emulated(lowered, feeds)["embedding"]) >= 0.999
    assert record.half_nodes > 0 and half_type_of(lowered) == {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[dtype]


def test_calibrated_fp16_lowering_keeps_the_overflowing_cross_layers_fp32_and_says_why():
    model = overflow_graph()
    last_layer = analyze(model).cross_layers[-1].nodes
    _, record = lower_half(model, "fp16", peaks(model, CALIBRATION))
    for node in last_layer:
        if node in record.kept_fp32 and "Mul" in node:
            assert "exceeds the fp16 safe range" in record.kept_fp32[node]
    assert any(n in record.kept_fp32 for n in last_layer)
    assert max(record.calibration["max_abs"].values()) > 65504


def test_the_deep_branch_runs_in_fp16():
    model = overflow_graph()
    deep = set(analyze(model).deep_nodes)
    _, record = lower_half(model, "fp16", peaks(model, CALIBRATION))
    assert deep and not deep & set(record.kept_fp32)


def _half_round_trips(model: onnx.ModelProto) -> int:
    """Casts to half whose readers include a Cast straight back to float."""
    readers = {}
    for node in model.graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node)
    half = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
    trips = 0
    for node in model.graph.node:
        if node.op_type == "Cast" and node.attribute[0].i in half:
            trips += any(r.op_type == "Cast" and r.attribute[0].i == TensorProto.FLOAT for r in readers.get(node.output[0], []))
    return trips


def test_lowering_leaves_no_half_round_trip_between_fp32_nodes():
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = overflow_graph()
    lowered, record = lower_half(model, "fp16", peaks(model, CALIBRATION))
    assert _half_round_trips(lowered) == 0
    # the trap it avoids: onnxruntime's converter with the same block list round-trips through half
    theirs = convert_float_to_float16(overflow_graph(), keep_io_types=True, node_block_list=list(record.kept_fp32))
    assert _half_round_trips(theirs) > 0


def test_inputs_and_outputs_stay_fp32():
    lowered, _ = lower_half(zoo_graph("ranking"), "fp16", peaks(zoo_graph("ranking"), [zoo_feeds("ranking")]))
    assert all(v.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.INT64) for v in lowered.graph.input)
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in lowered.graph.output)


def test_the_final_sigmoid_stays_fp32():
    model = zoo_graph("ranking")
    sigmoid = next(n.name for n in model.graph.node if n.op_type == "Sigmoid")
    _, record = lower_half(model, "fp16", peaks(model, [zoo_feeds("ranking")]))
    assert "output tail" in record.kept_fp32[sigmoid]


def test_without_calibration_the_whole_cross_branch_and_head_stay_fp32():
    model = overflow_graph()
    report = analyze(model)
    lowered, record = lower_half(model, "fp16")
    assert set(report.cross_nodes) | set(report.head_nodes) <= set(record.kept_fp32)
    assert record.calibration is None
    reference = run(model, overflow_feeds(9))["embedding"]
    assert cosine_min(reference, run_emulated(lowered, overflow_feeds(9))["embedding"]) >= 0.999


@pytest.mark.parametrize("family", ["retrieval", "ranking", "projection"])
def test_fp16_lowering_of_every_family_matches_fp32_under_emulation(family):
    model, feeds = zoo_graph(family), zoo_feeds(family, batch=32)
    lowered, _ = lower_half(model, "fp16", peaks(model, [zoo_feeds(family, batch=64)]))
    reference, emulated = run(model, feeds), run_emulated(lowered, feeds)
    for name in reference:
        assert cosine_min(reference[name], emulated[name]) >= 0.999, name


def test_unknown_precision_is_a_user_error():
    with pytest.raises(DcncError, match="--precision must be one of"):
        lower_half(zoo_graph("ranking"), "fp8")


def test_calibration_batch_missing_an_input_is_a_user_error():
    feeds = zoo_feeds("ranking")
    feeds.pop(next(iter(feeds)))
    with pytest.raises(DcncError, match="calibration batch 0: missing input"):
        peaks(zoo_graph("ranking"), [feeds])


def test_calibration_batch_with_nan_is_a_user_error():
    feeds = zoo_feeds("ranking")
    dense = next(k for k, v in feeds.items() if v.dtype == np.float32)
    feeds[dense][0, 0] = np.nan
    with pytest.raises(DcncError, match=f"'{dense}' holds 1 NaN"):
        peaks(zoo_graph("ranking"), [feeds])


def _cast_chain(to: int) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Cast", ["x"], ["h"], to=to),
        helper.make_node("Mul", ["h", "h"], ["sq"]),
        helper.make_node("Cast", ["sq"], ["y"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "square", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_emulation_overflows_a_half_product_to_inf_as_a_gpu_would():
    x = np.array([300.0, 1.0, -2.0], np.float32)  # 300^2 = 9e4 > 65504
    y = run_emulated(_cast_chain(TensorProto.FLOAT16), {"x": x})["y"]
    assert np.isinf(y[0]) and y[1] == 1.0


def test_emulation_rounds_bf16_products_to_8_bits_of_mantissa():
    x = np.array([1.0 + 2**-6, 3.0, 300.0], np.float32)
    y = run_emulated(_cast_chain(TensorProto.BFLOAT16), {"x": x})["y"]
    assert y[0] == 1.03125  # (1 + 2^-6)^2 = 1.0315..., rounded to bf16's 8 bits
    assert y[2] == 90112.0  # no overflow in bf16: 9e4 rounded


def test_emulated_graph_keeps_every_rounding_cast():
    emulated = emulate_half(_cast_chain(TensorProto.FLOAT16))
    to_half = [n for n in emulated.graph.node if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16]
    assert len(to_half) == 2  # the graph's own cast and the Mul's half output
