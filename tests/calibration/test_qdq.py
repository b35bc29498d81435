"""Q/DQ graphs per target: integer kernels on CPU, symmetric per-channel int8 for TensorRT, the skip path
unclipped, embeddings optional, nodes kept in FP32 on request."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from calib_towers import optimized_op_types, random_feeds, run, tower_graph
from onnx import numpy_helper

import calibration.qdq as qdq
from calibration.int8 import quantize_int8
from calibration.qdq import (
    cross_nodes,
    float_exit_gemms,
    quantizable_nodes,
    quantize_with_ranges,
    unclipped_tensors,
)
from calibration.ranges import collect_ranges
from calibration.reader import CalibrationData
from toolkit.core.errors import DcncError


@pytest.fixture(scope="module")
def calibration():
    return CalibrationData(random_feeds(tower_graph(), 256, seed=3), batch_size=128)


@pytest.fixture(scope="module")
def entropy_ranges(calibration):
    return collect_ranges(tower_graph(), calibration.batches, "entropy")


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _last_gemm(model: onnx.ModelProto) -> str:
    return [n.name for n in model.graph.node if n.op_type == "Gemm"][-1]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


@pytest.mark.parametrize("target", ["cpu", "tensorrt"])
@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_int8_tower_keeps_its_embeddings(calibration, method, target):
    model = tower_graph()
    quantized, record = quantize_int8(model, calibration, method=method, target=target)
    feeds = random_feeds(model, 64, seed=9)
    assert _cosine(run(quantized, feeds)[0], run(model, feeds)[0]) > 0.98  # random tiny tower: a loose floor
    assert record.method == method and record.target == target and record.calibration_samples == 256


def test_cpu_target_runs_every_gemm_as_an_integer_kernel(calibration, tmp_path):
    model = tower_graph()
    gemms = sum(node.op_type == "Gemm" for node in model.graph.node)
    quantized, _ = quantize_int8(model, calibration, target="cpu")
    ops = optimized_op_types(quantized, tmp_path)
    assert ops.count("QGemm") == gemms
    assert not {"Gemm", "FusedGemm", "MatMul"} & set(ops)


def test_cpu_target_leaves_no_dequantize_for_onnxruntime_to_run(calibration, tmp_path):
    # the head Gemm writes float straight into the L2 norm: no uint8 round trip at the end of the chain
    quantized, _ = quantize_int8(tower_graph(), calibration, target="cpu")
    ops = optimized_op_types(quantized, tmp_path)
    assert "DequantizeLinear" not in ops


def test_float_exit_gemms_keeps_quantized_outputs_that_integer_ops_read(entropy_ranges):
    quantized, _ = quantize_with_ranges(tower_graph(), entropy_ranges, "cpu")
    producer = {out: node for node in quantized.graph.node for out in node.output}
    quantized_gemms = {producer[n.input[0]].name for n in quantized.graph.node
                       if n.op_type == "QuantizeLinear" and n.input[0] in producer
                       and producer[n.input[0]].op_type == "Gemm"}  # fmt: skip
    gemms = {n.name for n in quantized.graph.node if n.op_type == "Gemm"}
    # cross, deep and the first head Gemm feed QLinearMul / QGemms; only the last one's output leaves the chain
    assert gemms - quantized_gemms == {_last_gemm(quantized)}


def test_float_exit_gemms_removes_only_the_output_rounding(entropy_ranges, monkeypatch):
    model = tower_graph()
    monkeypatch.setattr(qdq, "float_exit_gemms", lambda model: [])
    rounded, _ = quantize_with_ranges(model, entropy_ranges, "cpu")
    monkeypatch.undo()
    exact = onnx.ModelProto()
    exact.CopyFrom(rounded)
    changed = float_exit_gemms(exact)
    feeds = random_feeds(model, 256, seed=5)
    with_rounding, without = run(rounded, feeds)[0], run(exact, feeds)[0]
    assert changed == [_last_gemm(model)]
    assert len(exact.graph.node) == len(rounded.graph.node) - 2  # one QuantizeLinear, one DequantizeLinear
    assert np.abs(without - with_rounding).max() > 0  # the 8-bit rounding of the head output is gone...
    assert _cosine(without, with_rounding) > 0.999  # ...and nothing else changed


def test_float_exit_gemms_keeps_the_graph_outputs_of_a_ranker(tmp_path):
    model = tower_graph("ranking")
    data = CalibrationData(random_feeds(model, 128, seed=3), batch_size=128)
    quantized, _ = quantize_int8(model, data, target="cpu")
    assert [o.name for o in quantized.graph.output] == [o.name for o in model.graph.output]
    feeds = random_feeds(model, 64, seed=9)
    logit, probability = run(quantized, feeds)
    assert np.corrcoef(logit, run(model, feeds)[0])[0, 1] > 0.99
    assert "DequantizeLinear" not in optimized_op_types(quantized, tmp_path)


@pytest.mark.parametrize(("isa", "largest"), [("avx2", 64), ("avx512", 64), ("avx-vnni", 127), ("avx512-vnni", 127), ("amx", 127)])
def test_cpu_target_uses_uint8_activations_and_weights_of_the_isas_width(calibration, isa, largest):
    # 7-bit weights where vpmaddubsw's int16 pair sums could saturate, all 8 bits where VNNI / AMX sum in int32
    quantized, record = quantize_int8(tower_graph(), calibration, target="cpu", isa=isa)
    initializers = _initializers(quantized)
    quantize_points = {initializers[n.input[2]].dtype for n in quantized.graph.node if n.op_type == "QuantizeLinear"}
    assert quantize_points == {np.dtype(np.uint8)}
    weights = [initializers[n.input[0]] for n in quantized.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")]  # fmt: skip
    assert weights and all(w.dtype == np.int8 for w in weights)
    assert max(int(np.abs(w).max()) for w in weights) == largest
    assert record.isa == isa and record.config["reduce_range"] == (largest == 64)


def test_tensorrt_target_is_symmetric_int8_with_per_channel_weights(calibration):
    model = tower_graph()
    quantized, _ = quantize_int8(model, calibration, target="tensorrt")
    initializers = _initializers(quantized)
    for node in quantized.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero_point = initializers[node.input[2]]
            assert zero_point.dtype in (np.int8, np.int32) and not zero_point.any()
    producers = {out: node for node in quantized.graph.node for out in node.output}
    for gemm in (n for n in quantized.graph.node if n.op_type == "Gemm"):
        weight = producers[gemm.input[1]]
        assert weight.op_type == "DequantizeLinear"
        out_features = initializers[weight.input[0]].shape[0]
        assert initializers[weight.input[1]].shape == (out_features,)  # one scale per output channel
        assert gemm.input[2] in initializers and initializers[gemm.input[2]].dtype == np.float32  # float bias
    # outputs stay float: TensorRT fuses the bias, product and residual add into the GEMM epilogue
    consumers_of_gemm = [n for n in quantized.graph.node if n.op_type == "QuantizeLinear"
                         and n.input[0] in {g.output[0] for g in quantized.graph.node if g.op_type == "Gemm"}]  # fmt: skip
    assert not consumers_of_gemm


def test_skip_path_keeps_its_minmax_range_under_entropy(entropy_ranges):
    model = tower_graph()
    skip = unclipped_tensors(model)
    constants = {init.name for init in model.graph.initializer}
    # per cross layer: the product x0 * (...) (a Mul of two activations) and the Add that adds x_l back to it
    products = [n for n in model.graph.node if n.op_type == "Mul" and not constants & set(n.input)]
    residual_adds = [n for n in model.graph.node if n.op_type == "Add" and {p.output[0] for p in products} & set(n.input)]
    assert len(products) == len(residual_adds) == 2
    assert {n.output[0] for n in products + residual_adds} <= skip
    assert {n.input[1] for n in residual_adds} <= skip  # x_l, the skip input itself
    quantized, _ = quantize_with_ranges(model, entropy_ranges, "cpu")
    initializers = _initializers(quantized)
    clipped = [t for t in skip if entropy_ranges.calibrated[t] != entropy_ranges.minmax[t]]
    assert clipped  # entropy would clip the skip path: the quantizer must not use that range
    checked = 0
    for node in quantized.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in clipped:
            low, high = entropy_ranges.minmax[node.input[0]]
            scale = float(initializers[node.input[1]])
            assert scale == pytest.approx((max(high, 0) - min(low, 0)) / 255, rel=1e-5)
            checked += 1
    assert checked


def test_embedding_tables_stay_fp32_by_default(entropy_ranges):
    model = tower_graph()
    quantized, nodes = quantize_with_ranges(model, entropy_ranges, "cpu")
    gathers = [n for n in quantized.graph.node if n.op_type == "Gather"]
    initializers = _initializers(quantized)
    assert gathers and all(initializers[g.input[0]].dtype == np.float32 for g in gathers if g.input[0] in initializers)
    assert not any(n in nodes for n in (g.name for g in gathers))


def test_quantize_embeddings_stores_tables_as_int8(entropy_ranges):
    model = tower_graph()
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    quantized, nodes = quantize_with_ranges(model, entropy_ranges, "cpu", quantize_embeddings=True)
    dtypes = {i.name: numpy_helper.to_array(i).dtype for i in quantized.graph.initializer}
    assert all(dtypes.get(f"{t}_quantized") in (np.uint8, np.int8) for t in tables)
    assert tables and all(t not in dtypes for t in tables)  # the float tables are gone


def test_keep_fp32_leaves_the_node_in_float(entropy_ranges):
    model = tower_graph()
    head = next(n for n in quantizable_nodes(model) if n.startswith("head/") and "Gemm" in n)
    quantized, nodes = quantize_with_ranges(model, entropy_ranges, "cpu", keep_fp32=[head])
    node = next(n for n in quantized.graph.node if n.name == head)
    initializers = _initializers(quantized)
    assert head not in nodes and initializers[node.input[1]].dtype == np.float32


def test_keep_fp32_of_the_gemm_after_a_relu_keeps_the_relu(calibration):
    # quantize_static drops a ReLU whose output range starts at 0 (the Q clamps); when the Gemm reading it
    # stays float the Q/DQ pair goes (float exit) and with it the clamp, unless the ReLU is kept in the graph
    model = tower_graph()
    relus = sum(n.op_type == "Relu" for n in model.graph.node)
    quantized, _ = quantize_int8(model, calibration, keep_fp32=["deep/1/Gemm"])
    feeds = random_feeds(model, 256, seed=5)
    assert sum(n.op_type == "Relu" for n in quantized.graph.node) == relus
    assert _cosine(run(quantized, feeds)[0], run(model, feeds)[0]) > 0.999


def test_cpu_target_folds_every_relu_into_its_integer_gemm(calibration, tmp_path):
    quantized, _ = quantize_int8(tower_graph(), calibration, target="cpu")
    assert "Relu" not in optimized_op_types(quantized, tmp_path)


def test_keep_fp32_of_an_unknown_node_is_a_user_error(entropy_ranges):
    with pytest.raises(DcncError, match="no node 'nope'"):
        quantize_with_ranges(tower_graph(), entropy_ranges, "cpu", keep_fp32=["nope"])


def test_unknown_target_is_a_user_error(entropy_ranges):
    with pytest.raises(DcncError, match="--target"):
        quantize_with_ranges(tower_graph(), entropy_ranges, "gpu")


def _cross_readers(model: onnx.ModelProto) -> list:
    """The cross layers' products and residual Adds."""
    products, residuals = cross_nodes(model)
    return products + residuals


@pytest.mark.parametrize(("target", "path"), [("cpu", "float"), ("tensorrt", "integer")])
def test_cross_product_and_residual_read_float_x0_and_x_l(calibration, target, path):
    # the Gemms read their own Q/DQ copy of x_l; the skip path and x0 * (W x + b) stay exact
    model = tower_graph()
    quantized, _ = quantize_with_ranges(model, collect_ranges(model, calibration.batches), target, cross_path=path)
    dequantized = {n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    names = {n.name for n in _cross_readers(model)}
    readers = [n for n in quantized.graph.node if n.name in names]
    assert len(readers) == len(names) >= 4 and not any(set(n.input) & dequantized for n in readers)
    gemms = [n for n in quantized.graph.node if n.op_type == "Gemm"]
    assert all(n.input[0] in dequantized for n in gemms)


def test_float_cross_path_still_runs_every_gemm_as_an_integer_kernel(calibration, tmp_path):
    model = tower_graph()
    quantized, _ = quantize_with_ranges(model, collect_ranges(model, calibration.batches), "cpu", cross_path="float")
    ops = optimized_op_types(quantized, tmp_path)
    assert ops.count("QGemm") == sum(n.op_type == "Gemm" for n in model.graph.node)
    assert not {"QLinearMul", "QLinearAdd", "FusedGemm"} & set(ops) and {"Mul", "Add"} <= set(ops)


def test_float_cross_path_lowers_int8_error_where_cross_layers_amplify_outliers():
    model = tower_graph("retrieval", "mixture")
    scaled = {n: v * 5 if v.dtype == np.float32 else v for n, v in random_feeds(model, 512, seed=3).items()}
    ranges = collect_ranges(model, CalibrationData(scaled).batches)
    feeds = {n: v * 5 if v.dtype == np.float32 else v for n, v in random_feeds(model, 256, seed=9).items()}
    expected = run(model, feeds)[0]

    def error(path: str) -> float:
        int8, _ = quantize_with_ranges(model, ranges, "cpu", reduce_range=False, cross_path=path)
        return float(np.linalg.norm(run(int8, feeds, unfused=True)[0] - expected) / np.linalg.norm(expected))

    assert error("float") < 0.6 * error("integer")  # measured 0.040 against 0.084


def test_unknown_cross_path_is_a_user_error(entropy_ranges):
    with pytest.raises(DcncError, match="cross path must be one of"):
        quantize_with_ranges(tower_graph(), entropy_ranges, "cpu", cross_path="half")
