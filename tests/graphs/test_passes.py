"""The pass manager and its passes: parity with the input on every zoo family, what each pass changes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from test_branches import KerasStyleTower, TorchRecStyleTower
from tower_graphs import module_graph, run, zoo_feeds, zoo_graph

from graphs.branches import ConcurrencyBroken, analyze
from graphs.passes import manager
from graphs.passes.manager import (
    DEFAULT_PASSES,
    PASSES,
    attach_records,
    resolve_passes,
    run_passes,
)
from toolkit.core.errors import DcncError

FAMILIES = ["retrieval", "ranking", "projection"]
KINDS = [("ranking", "mixture"), ("ranking", "v1"), ("ranking", "low_rank")]


def _assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, feeds) -> None:
    want, got = run(before, feeds), run(after, feeds)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("name", list(PASSES))
@pytest.mark.parametrize("family", FAMILIES)
def test_each_pass_keeps_the_outputs_of_every_family(family, name):
    model = zoo_graph(family)
    out, records = run_passes(model, [name])
    _assert_same_outputs(model, out, zoo_feeds(family))
    assert records[0].name == name and records[0].nodes_before == len(model.graph.node)


@pytest.mark.parametrize(("family", "kind"), KINDS + [("ranking", "full")])
def test_all_passes_keep_the_outputs_of_every_cross_kind(family, kind):
    model = zoo_graph(family, kind, "stacked_parallel" if kind == "full" else "parallel")
    out, _ = run_passes(model, "gpu")
    _assert_same_outputs(model, out, zoo_feeds(family, kind))


def test_default_passes_are_cleanup_fold_canonicalize_and_none_is_raw():
    assert resolve_passes("default") == list(DEFAULT_PASSES) == ["cleanup", "fold", "canonicalize"]
    assert resolve_passes("none") == []
    assert resolve_passes("cleanup, fuse_entry") == ["cleanup", "fuse_entry"]


def test_unknown_pass_is_a_user_error_naming_it():
    with pytest.raises(DcncError, match="unknown pass 'fusion'"):
        resolve_passes("cleanup,fusion")


def test_a_pass_that_breaks_the_concurrency_invariant_fails_naming_the_pass(monkeypatch):
    def serialise(model: onnx.ModelProto):
        report = analyze(model)
        for node in model.graph.node:  # the MLP now reads the cross output instead of x0
            if node.name in report.deep_nodes and report.x0 in node.input:
                node.input[list(node.input).index(report.x0)] = report.cross_layers[0].output
        return model, ["rewired"]

    monkeypatch.setitem(PASSES, "serialise", serialise)
    with pytest.raises(ConcurrencyBroken, match="after pass 'serialise'"):
        run_passes(zoo_graph("ranking"), ["cleanup", "serialise"])


def test_a_pass_that_leaves_an_invalid_graph_fails_naming_the_pass(monkeypatch):
    def dangle(model: onnx.ModelProto):
        model.graph.node[-1].input[0] = "nowhere"
        return model, []

    monkeypatch.setitem(PASSES, "dangle", dangle)
    with pytest.raises(DcncError, match="after pass 'dangle': invalid ONNX graph"):
        run_passes(zoo_graph("ranking"), ["dangle"])


def test_records_are_kept_in_the_model_metadata():
    model, records = run_passes(zoo_graph("ranking"), "default")
    attach_records(model, records)
    stored = json.loads({p.key: p.value for p in model.metadata_props}[manager.METADATA_KEY])
    assert [r["name"] for r in stored] == ["cleanup", "fold", "canonicalize"]
    assert stored[2]["changes"] and stored[2]["nodes_after"] == len(model.graph.node)


def _cluttered() -> onnx.ModelProto:
    """y = Relu(x @ W + b) wrapped in an Identity, an inference Dropout, a no-op Cast, a dead branch, a duplicate
    initializer and a constant subgraph (b = b1 + b2) to fold."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    b1, b2 = np.full(4, 0.5, np.float32), np.full(4, 0.25, np.float32)
    nodes = [
        helper.make_node("Identity", ["x"], ["x_id"]),
        helper.make_node("Dropout", ["x_id"], ["x_drop"]),
        helper.make_node("Cast", ["x_drop"], ["x_cast"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Add", ["b1", "b2"], ["b"]),
        helper.make_node("MatMul", ["x_cast", "w"], ["h"]),
        helper.make_node("MatMul", ["x_cast", "w_copy"], ["unused"]),
        helper.make_node("Add", ["h", "b"], ["h_b"]),
        helper.make_node("Relu", ["h_b"], ["y"]),
    ]
    inits = [numpy_helper.from_array(v, n) for n, v in (("w", w), ("w_copy", w.copy()), ("b1", b1), ("b2", b2))]
    graph = helper.make_graph(
        nodes, "clutter", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", 4])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_cleanup_removes_identity_dropout_noop_cast_and_dead_nodes():
    model = _cluttered()
    out, records = run_passes(model, ["cleanup"])
    assert [n.op_type for n in out.graph.node] == ["Add", "MatMul", "Add", "Relu"]
    assert "w_copy" not in {i.name for i in out.graph.initializer}
    assert any("Dropout" in c for c in records[0].changes)
    _assert_same_outputs(model, out, {"x": np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)})


def test_cleanup_merges_duplicate_initializers():
    model = _cluttered()
    model.graph.node[5].output[0] = "h2"  # keep the twin MatMul alive: its weight is a duplicate of w
    model.graph.node[6].input[1] = "h2"
    model.graph.node.insert(6, helper.make_node("Add", ["h", "b"], ["h_dup"]))
    model.graph.node[7].input[0] = "h_dup"
    out, _ = run_passes(model, ["cleanup"])
    assert {"w", "w_copy"} - {i.name for i in out.graph.initializer}


def test_fold_turns_a_constant_subgraph_into_an_initializer():
    out, records = run_passes(_cluttered(), ["cleanup", "fold"])
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Add", "Relu"]
    assert records[1].nodes_after == records[1].nodes_before - 1


def test_canonicalize_names_nodes_by_branch_and_layer():
    out, _ = run_passes(zoo_graph("ranking"), ["canonicalize"])
    names = {n.name for n in out.graph.node}
    assert {"cross/0/Gemm", "cross/0/Mul", "cross/1/Add", "deep/0/Gemm", "deep/1/Relu", "head/0/Concat"} <= names


@pytest.mark.parametrize("tower", [TorchRecStyleTower, KerasStyleTower], ids=["torchrec", "keras"])
def test_canonicalize_gives_other_libraries_layouts_the_same_names(tower):
    model = module_graph(tower(), tower.__name__)
    out, _ = run_passes(model, ["canonicalize"])
    names = {n.name for n in out.graph.node}
    assert {"cross/0/Mul", "cross/1/Mul", "deep/0/Relu"} <= names
    _assert_same_outputs(model, out, {"features": np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)})


def test_keras_matmul_add_kernels_become_gemm():
    out, records = run_passes(module_graph(KerasStyleTower(), "KerasStyleTower"), ["canonicalize"])
    assert sum(n.op_type == "Gemm" and n.name.startswith("cross/") for n in out.graph.node) == 3
    assert "MatMul + Add" in records[0].changes[0]


def test_entry_fusion_leaves_one_gemm_reading_x0():
    out, records = run_passes(zoo_graph("retrieval"), ["canonicalize", "fuse_entry"])
    report = analyze(out)
    gemms_on_x0 = [n.name for n in out.graph.node if report.x0 in n.input and n.op_type in ("Gemm", "MatMul")]
    assert gemms_on_x0 == ["entry/Gemm"]
    assert report.entry_nodes == ["entry/Gemm", "entry/Split"] and report.parallel
    assert "fused 2 Gemms" in records[1].changes[0]


def test_pass_pipeline_is_a_model_to_model_callable_that_keeps_its_records():
    pipeline = manager.PassPipeline("cleanup,canonicalize")
    out = pipeline(zoo_graph("ranking"))
    assert isinstance(out, onnx.ModelProto)
    assert [r.name for r in pipeline.records] == ["cleanup", "canonicalize"]
