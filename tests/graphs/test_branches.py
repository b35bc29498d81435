"""Branch analysis: x0, cross/deep/head from the ONNX alone, the concurrency invariant, extraction and timing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from calib_towers import random_feeds, tower_graph
from onnx import helper
from torch import nn
from tower_graphs import module_graph, run, zoo_feeds, zoo_graph

from calibration.int8 import quantize_int8
from calibration.reader import CalibrationData
from graphs.branches import (
    ConcurrencyBroken,
    analyze,
    check_concurrency,
    extract_branch,
)
from toolkit.core.errors import DcncError
from toolkit.core.signature import TensorSpec
from toolkit.evaluate.branch_timing import time_branches


@pytest.mark.parametrize("family", ["retrieval", "ranking", "projection"])
def test_every_family_has_two_cross_layers_on_a_shared_x0(family):
    report = analyze(zoo_graph(family))
    assert report.structure == "parallel"
    assert len(report.cross_layers) == 2
    assert report.x0_width == 11 + (4 if family == "projection" else 0)  # projection adds the projected sequence
    assert not report.violations


@pytest.mark.parametrize("kind", ["full", "low_rank", "mixture", "v1"])
def test_every_cross_kind_is_recognised(kind):
    report = analyze(zoo_graph("ranking", kind))
    assert [layer.index for layer in report.cross_layers] == [0, 1]
    assert report.parallel and report.cross_outputs and report.deep_outputs


def test_stacked_tower_is_serial_with_everything_after_the_cross_in_the_head():
    report = analyze(zoo_graph("ranking", "full", "stacked"))
    assert report.structure == "serial"
    assert report.deep_nodes == []
    assert any("Gemm" in n or "linear" in n for n in report.head_nodes)


def test_stacked_parallel_puts_the_stacked_mlp_on_the_cross_branch():
    model = zoo_graph("ranking", "full", "stacked_parallel")
    report = analyze(model)
    gemms = {n.name for n in model.graph.node if n.op_type == "Gemm"}
    # cross: 2 layer Gemms + 2 stacked-MLP Gemms; deep: its 2 Gemms
    assert len(gemms & set(report.cross_nodes)) == 4
    assert len(gemms & set(report.deep_nodes)) == 2


def test_a_graph_without_cross_layers_has_no_structure():
    mlp = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    mlp.input_specs, mlp.output_names = [TensorSpec("x", "float32", ("B", 6))], ["y"]
    assert analyze(module_graph(mlp, "mlp")).structure == "none"


def _rewire(model: onnx.ModelProto, node_name: str, index: int, tensor: str) -> onnx.ModelProto:
    for node in model.graph.node:
        if node.name == node_name:
            node.input[index] = tensor
    return model


def test_invariant_catches_a_deep_branch_fed_by_the_cross_branch():
    model = zoo_graph("ranking")
    report = analyze(model)
    deep_entry = next(n for n in model.graph.node if n.name in report.deep_nodes and report.x0 in n.input)
    broken = _rewire(model, deep_entry.name, 0, report.cross_layers[0].output)  # deep reads layer 0's output
    with pytest.raises(ConcurrencyBroken, match="no deep branch consumes x0|reads"):
        check_concurrency(broken)


def hand_built_tower(deep_feeds_cross: bool = False) -> onnx.ModelProto:
    """A 2-layer full-rank cross network and a 1-layer MLP on x0 (both 4 wide), written by hand as another
    exporter might; `deep_feeds_cross` makes cross layer 1 read the MLP's output, a path between the branches."""
    rng = np.random.default_rng(0)
    weights = {f"w{i}": rng.standard_normal((4, 4)).astype(np.float32) for i in range(4)}
    weights.update({f"b{i}": rng.standard_normal(4).astype(np.float32) for i in range(4)})
    nodes = [
        helper.make_node("MatMul", ["x0", "w2"], ["deep_mm"]),
        helper.make_node("Add", ["deep_mm", "b2"], ["deep_pre"]),
        helper.make_node("Relu", ["deep_pre"], ["deep"]),
        helper.make_node("MatMul", ["x0", "w0"], ["mm0"]),
        helper.make_node("Add", ["mm0", "b0"], ["q0"]),
        helper.make_node("Mul", ["x0", "q0"], ["p0"]),
        helper.make_node("Add", ["p0", "x0"], ["x1"]),
        helper.make_node("Add", ["x1", "deep"] if deep_feeds_cross else ["x1", "zero"], ["x1b"]),
        helper.make_node("MatMul", ["x1b", "w1"], ["mm1"]),
        helper.make_node("Add", ["mm1", "b1"], ["q1"]),
        helper.make_node("Mul", ["x0", "q1"], ["p1"]),
        helper.make_node("Add", ["x1", "p1"], ["x2"]),
        helper.make_node("Concat", ["x2", "deep"], ["joined"], axis=1),
        helper.make_node("Slice", ["joined", "s0", "s1", "ax"], ["half"]),
        helper.make_node("MatMul", ["half", "w3"], ["y"]),
    ]
    inits = [onnx.numpy_helper.from_array(v, k) for k, v in weights.items()]
    inits += [onnx.numpy_helper.from_array(np.array(v, dtype), n) for n, v, dtype in
              (("zero", 0.0, np.float32), ("s0", [0], np.int64), ("s1", [4], np.int64), ("ax", [1], np.int64))]
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("x0", onnx.TensorProto.FLOAT, ["B", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", 4])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_hand_built_tower_passes_the_invariant():
    report = check_concurrency(hand_built_tower())
    assert len(report.cross_layers) == 2 and report.x0 == "x0"


def test_invariant_catches_a_cross_layer_reading_the_deep_branch():
    with pytest.raises(ConcurrencyBroken, match="does not compute from x0"):
        check_concurrency(hand_built_tower(deep_feeds_cross=True))


def test_extracted_branches_reproduce_the_towers_intermediate_tensors():
    model = zoo_graph("ranking", "low_rank")
    report = analyze(model)
    feeds = zoo_feeds("ranking", "low_rank")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    wanted = [report.x0, *report.cross_outputs, *report.deep_outputs]
    probe.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in wanted)
    inside = run(probe, feeds)
    both = run(extract_branch(model, "parallel", report), {report.x0: inside[report.x0]})
    for name in report.cross_outputs + report.deep_outputs:
        np.testing.assert_allclose(both[name], inside[name], rtol=1e-5, atol=1e-6)
    assert set(run(extract_branch(model, "cross", report), {report.x0: inside[report.x0]})) == set(report.cross_outputs)


def test_branch_timing_reports_all_three_times_and_their_ratio():
    timing = time_branches(zoo_graph("retrieval"), batch=64, repeats=3, warmup=1, threads=1)
    assert min(timing["t_cross_ms"], timing["t_deep_ms"], timing["t_parallel_ms"]) > 0
    assert timing["ratio"] == pytest.approx(timing["t_parallel_ms"] / max(timing["t_cross_ms"], timing["t_deep_ms"]))


class TorchRecStyleTower(nn.Module):
    """TorchRec's CrossNet (kernels [N, N] applied as matmul(W, x_l) on [B, N, 1]) and LowRank-free MLP, with the
    bias added before the x0 product, as torchrec.modules.crossnet writes it."""

    output_names = ["score"]

    def __init__(self, width: int = 6, layers: int = 2):
        super().__init__()
        self.kernels = nn.Parameter(torch.randn(layers, width, width) * 0.3)
        self.bias = nn.Parameter(torch.randn(layers, width, 1) * 0.1)
        self.deep = nn.Sequential(nn.Linear(width, 5), nn.ReLU())
        self.out = nn.Linear(width + 5, 1)
        self.input_specs = [TensorSpec("features", "float32", ("B", width))]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x_0 = features.unsqueeze(2)
        x_l = x_0
        for layer in range(self.kernels.shape[0]):
            xl_w = torch.matmul(self.kernels[layer], x_l)
            x_l = x_0 * (xl_w + self.bias[layer]) + x_l
        return self.out(torch.cat([torch.squeeze(x_l, dim=2), self.deep(features)], dim=-1))


class KerasStyleTower(nn.Module):
    """Keras / TF-Recommenders Cross: kernel stored [in, out], `x0 * (x @ K + b) + x`, written x-first."""

    output_names = ["score"]

    def __init__(self, width: int = 6, layers: int = 3):
        super().__init__()
        self.kernels = nn.ParameterList(nn.Parameter(torch.randn(width, width) * 0.3) for _ in range(layers))
        self.biases = nn.ParameterList(nn.Parameter(torch.randn(width) * 0.1) for _ in range(layers))
        self.deep = nn.Sequential(nn.Linear(width, 4), nn.ReLU())
        self.out = nn.Linear(width + 4, 1)
        self.input_specs = [TensorSpec("features", "float32", ("B", width))]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features
        for kernel, bias in zip(self.kernels, self.biases):
            x = x + features * (torch.matmul(x, kernel) + bias)
        return self.out(torch.cat([x, self.deep(features)], dim=-1))


def test_torchrec_layout_is_recognised_with_x0_before_its_unsqueeze():
    report = analyze(module_graph(TorchRecStyleTower(), "torchrec"))
    assert len(report.cross_layers) == 2
    assert report.parallel, report.violations


def test_keras_layout_is_recognised():
    report = analyze(module_graph(KerasStyleTower(), "keras"))
    assert len(report.cross_layers) == 3
    assert report.parallel


def test_branch_timing_of_an_int8_graph_says_the_analysis_does_not_follow_qdq_pairs():
    model = tower_graph()
    assert analyze(model).structure == "parallel"
    quantized, _ = quantize_int8(model, CalibrationData(random_feeds(model, 64, seed=0), batch_size=64), target="cpu")
    with pytest.raises(DcncError, match=r"not measured on INT8 \(Q/DQ\) graphs"):
        time_branches(quantized, batch=8)
