"""Horizontal fusion pass: the Gemms that read x0 (cross layer 0's and the MLP's first layer) become one Gemm
over concatenated weights and a Split, so a GPU reads x0 once and runs one wider GEMM.

Off by default for CPU targets, where it measured no gain; the branches stay concurrent after it (the fused
Gemm + Split is a shared entry computed from x0 alone, which branch analysis recognises).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphs.branches import analyze
from graphs.passes.cleanup import with_nodes


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _fusable_weights(node: onnx.NodeProto, weights: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """(W as [out, in], bias [out]) of a plain Gemm on constant weights, else None."""
    if node.op_type != "Gemm" or _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0:
        return None
    if len(node.input) < 2 or node.input[1] not in weights:
        return None
    w = weights[node.input[1]]
    if w.ndim != 2:
        return None
    w = w if _attr(node, "transB", 0) else w.T
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in weights or _attr(node, "beta", 1.0) != 1.0:
            return None
        bias = weights[node.input[2]]
        if bias.ndim > 1 and bias.shape[0] != 1:
            return None
        bias = np.broadcast_to(bias.reshape(-1), (w.shape[0],))
    else:
        bias = np.zeros(w.shape[0], dtype=w.dtype)
    return w, bias


def fuse_entry_gemms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The model with x0's Gemms fused into one Gemm + Split, and what changed."""
    report = analyze(model)
    if report.x0 is None:
        return model, ["no cross network: nothing to fuse"]
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    readers = [
        (i, node, fused)
        for i, node in enumerate(model.graph.node)
        if len(node.input) > 0 and node.input[0] == report.x0 and (fused := _fusable_weights(node, weights)) is not None
    ]
    if len(readers) < 2 or len({f[0].dtype for _, _, f in readers}) != 1:
        return model, [f"{len(readers)} fusable Gemm(s) read x0: nothing to fuse"]
    stem = report.x0.replace("/", "_")
    w = np.concatenate([f[0] for _, _, f in readers], axis=0)
    b = np.concatenate([f[1] for _, _, f in readers], axis=0).astype(w.dtype)
    widths = np.array([f[0].shape[0] for _, _, f in readers], dtype=np.int64)
    new_inits = [
        numpy_helper.from_array(w, f"{stem}.entry.weight"),
        numpy_helper.from_array(b, f"{stem}.entry.bias"),
        numpy_helper.from_array(widths, f"{stem}.entry.split"),
    ]
    gemm = helper.make_node(
        "Gemm", [report.x0, new_inits[0].name, new_inits[1].name], [f"{stem}.entry"], name="entry/Gemm", transB=1
    )
    outputs = [node.output[0] for _, node, _ in readers]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if opset >= 13:  # Split takes its sizes as an input from opset 13, as an attribute before
        split = helper.make_node("Split", [gemm.output[0], new_inits[2].name], outputs, name="entry/Split", axis=-1)
    else:
        split = helper.make_node("Split", [gemm.output[0]], outputs, name="entry/Split", axis=-1, split=widths.tolist())
        new_inits.pop()
    fused = {i for i, _, _ in readers}
    nodes = []
    for i, node in enumerate(model.graph.node):
        if i == min(fused):
            nodes += [gemm, split]
        if i not in fused:
            nodes.append(node)
    out = with_nodes(model, nodes, new_inits)
    names = ", ".join(node.name or node.op_type for _, node, _ in readers)
    return out, [f"fused {len(readers)} Gemms on x0 ({names}) into one [{w.shape[1]} -> {w.shape[0]}] Gemm + Split"]
