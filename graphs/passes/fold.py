"""Constant folding pass: evaluate every node whose inputs are all constants into an initializer."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes import common as ir_passes


def fold_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The folded model and what changed."""
    graph = ir.serde.deserialize_model(model)
    nodes, initializers = len(graph.graph), len(graph.graph.initializers)
    onnxscript.optimizer.fold_constants(graph)
    ir_passes.RemoveUnusedNodesPass()(graph)
    folded = nodes - len(graph.graph)
    changes = []
    if folded:
        changes.append(f"folded {folded} node(s) into constants")
    if len(graph.graph.initializers) != initializers:
        changes.append(f"initializers {initializers} -> {len(graph.graph.initializers)}")
    return ir.serde.serialize_model(graph), changes
