"""`dcnc inspect`: any ONNX file in, one report out; a corrupt file is one line and exit 2."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from test_branches import hand_built_tower
from tower_graphs import zoo_feeds, zoo_graph
from typer.testing import CliRunner

from calibration.cache import calibrated_ranges
from cli import app
from graphs.inspect import inspect_model
from graphs.precision import lower_half


def _save(model: onnx.ModelProto, tmp_path, name: str = "model.onnx") -> str:
    path = tmp_path / name
    onnx.save(model, str(path))
    return str(path)


def _one_gemm(qdq: bool = False) -> onnx.ModelProto:
    """y = x @ W + b with x [B, 4] and W [4, 3]; optionally x passes through a QuantizeLinear / DequantizeLinear pair."""
    nodes = [helper.make_node("Gemm", ["xq" if qdq else "x", "w", "b"], ["y"])]
    inits = [numpy_helper.from_array(np.ones((4, 3), np.float32), "w"), numpy_helper.from_array(np.zeros(3, np.float32), "b")]
    if qdq:
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x8"]),
                 helper.make_node("DequantizeLinear", ["x8", "s", "z"], ["xq"]), *nodes]  # fmt: skip
        inits += [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
    graph = helper.make_graph(
        nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_gemm_flops_per_sample_are_2_k_n_plus_the_bias(tmp_path):
    info = inspect_model(_save(_one_gemm(), tmp_path))
    assert info["flops_per_sample"]["total"] == 2 * 4 * 3 + 3
    assert info["parameters"]["total"] == 15
    assert info["inputs"] == [{"name": "x", "dtype": "float", "shape": ["N", 4]}]


def test_a_graph_without_cross_layers_reports_no_branches(tmp_path):
    info = inspect_model(_save(_one_gemm(), tmp_path))
    assert info["branches"]["structure"] == "none"


def test_qdq_nodes_are_counted(tmp_path):
    assert inspect_model(_save(_one_gemm(qdq=True), tmp_path))["qdq"] == 2


def test_branch_flops_and_parameters_of_a_tower(tmp_path):
    info = inspect_model(_save(hand_built_tower(), tmp_path))
    assert info["branches"]["structure"] == "parallel" and info["branches"]["cross_layers"] == 2
    # per layer a 4x4 MatMul (2*16) and bias Add, Mul, residual Add (4 each); layer 1 also adds a zero (4)
    assert info["flops_per_sample"]["cross"] == 2 * (2 * 16 + 4 + 4 + 4) + 4
    assert info["parameters"]["deep"] == 16 + 4


def test_lowered_graph_shows_its_half_nodes(tmp_path):
    lowered, record = lower_half(zoo_graph("ranking"), "fp16", calibrated_ranges(zoo_graph("ranking"), [zoo_feeds("ranking")])[0].peaks())
    info = inspect_model(_save(lowered, tmp_path))
    assert info["precision_counts"]["float16"] >= record.half_nodes


def test_cli_prints_json(tmp_path):
    result = CliRunner().invoke(app, ["inspect", _save(zoo_graph("retrieval"), tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["opsets"]["ai.onnx"] == 18 and info["branches"]["structure"] == "parallel"


def test_cli_on_a_corrupt_file_exits_2_with_one_line(tmp_path):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(b"\x08\x07\x12\xff\xff\xff" + bytes(range(256)))
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "corrupt.onnx" in result.output


def test_cli_on_a_missing_file_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "absent.onnx")])
    assert result.exit_code == 2 and "ONNX file not found" in result.output
