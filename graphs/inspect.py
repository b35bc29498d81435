"""`dcnc inspect`: what an ONNX file holds: opset, inputs and outputs, op counts, parameters and FLOPs per sample
per branch, the cross/deep branch structure, precision per node and Q/DQ count. Works on any ONNX file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from graphs.branches import analyze
from toolkit.core.errors import first_line
from toolkit.core.onnxio import load_onnx

MATMUL_OPS = {"Gemm", "MatMul"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
# Ops that move or reshape data without arithmetic.
NO_FLOP_OPS = {
    "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split", "Slice", "Gather", "Identity", "Shape",
    "Cast", "Expand", "Flatten", "Constant", "ConstantOfShape", "QuantizeLinear", "DequantizeLinear",
}  # fmt: skip


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def _dtype(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type else "unknown"


def _per_sample_elements(value: onnx.ValueInfoProto | None) -> int | None:
    """Elements of a tensor with every symbolic dimension (the batch) set to 1; None when the shape is unknown."""
    if value is None or not value.type.tensor_type.HasField("shape"):
        return None
    return int(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in _dims(value)], dtype=np.int64))


def _node_flops(node: onnx.NodeProto, values: dict[str, onnx.ValueInfoProto]) -> int | None:
    """FLOPs per sample: 2*K per output element of a Gemm/MatMul (plus the bias), one per output element of
    arithmetic elsewhere, none for data movement. None when shapes are unknown."""
    if node.op_type in NO_FLOP_OPS:
        return 0
    out = _per_sample_elements(values.get(node.output[0])) if node.output else 0
    if out is None:
        return None
    if node.op_type in MATMUL_OPS:
        a = values.get(node.input[0])
        if a is None or not _dims(a):
            return None
        transposed = node.op_type == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute)
        k = _dims(a)[0 if transposed else -1]
        k = k if isinstance(k, int) and k > 0 else 1
        return 2 * out * k + (out if len(node.input) > 2 and node.input[2] else 0)
    return out


def inspect_model(path: str | Path) -> dict:
    """Everything `dcnc inspect` prints, as a JSON-ready dict."""
    model = load_onnx(path, external_data=False)
    try:
        onnx.checker.check_model(model)
        problem = None
    except onnx.checker.ValidationError as err:
        problem = first_line(err)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inspection reports what it can of a graph inference rejects
        inferred = model
    graph = inferred.graph
    values = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}
    initializers = {i.name: i for i in graph.initializer}
    for init in graph.initializer:
        values.setdefault(init.name, onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    names = [n.name or f"{n.op_type}#{i}" for i, n in enumerate(graph.node)]

    report = analyze(model) if problem is None else None
    role = {}
    if report is not None and report.structure != "none":
        for group, members in (("cross", report.cross_nodes), ("entry", report.entry_nodes),
                               ("deep", report.deep_nodes), ("head", report.head_nodes)):  # fmt: skip
            role.update(dict.fromkeys(members, group))
    flops: Counter = Counter()
    params: Counter = Counter()
    counted: set[str] = set()
    partial = False
    precision: dict[str, str] = {}
    for name, node in zip(names, graph.node):
        branch = role.get(name, "other")
        f = _node_flops(node, values)
        partial |= f is None
        flops[branch] += f or 0
        for t in node.input:
            if t in initializers and t not in counted:
                counted.add(t)
                params[branch] += int(np.prod(initializers[t].dims, dtype=np.int64))
        out = values.get(node.output[0]) if node.output else None
        precision[name] = _dtype(out.type.tensor_type.elem_type) if out is not None else "unknown"
    ops = Counter(n.op_type for n in graph.node)
    return {
        "path": str(path),
        "valid": problem is None,
        "problem": problem,
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": [{"name": v.name, "dtype": _dtype(v.type.tensor_type.elem_type), "shape": _dims(v)}
                   for v in graph.input if v.name not in initializers],  # fmt: skip
        "outputs": [{"name": v.name, "dtype": _dtype(v.type.tensor_type.elem_type), "shape": _dims(v)} for v in graph.output],
        "nodes": len(graph.node),
        "op_counts": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": {"total": sum(params.values()), **{k: params[k] for k in sorted(params)}},
        "flops_per_sample": {"total": sum(flops.values()), **{k: flops[k] for k in sorted(flops)}, "partial": partial},
        "branches": None if report is None else {
            "structure": report.structure,
            "x0": report.x0,
            "x0_width": report.x0_width,
            "cross_layers": len(report.cross_layers),
            "entry_nodes": report.entry_nodes,
            "cross_outputs": report.cross_outputs,
            "deep_outputs": report.deep_outputs,
            "violations": report.violations,
        },
        "precision_counts": dict(Counter(precision.values())),
        "precision": precision,
        "qdq": sum(ops[op] for op in QDQ_OPS),
        "metadata": sorted(p.key for p in model.metadata_props),
    }


def format_inspection(info: dict) -> str:
    """The human-readable report (the per-node precision list stays in --json)."""
    lines = [f"{info['path']}: IR {info['ir_version']}, opsets "
             + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()) + (f", by {info['producer']}" if info["producer"] else "")]  # fmt: skip
    if not info["valid"]:
        lines.append(f"  checker: {info['problem']}")
    for kind in ("inputs", "outputs"):
        lines.append(f"{kind}:")
        lines += [f"  {v['name']}: {v['dtype']} [{', '.join(map(str, v['shape']))}]" for v in info[kind]]
    lines.append(f"nodes: {info['nodes']} (" + ", ".join(f"{op} {n}" for op, n in info["op_counts"].items()) + ")")
    branches = info["branches"]
    if branches and branches["structure"] != "none":
        lines.append(
            f"branches: {branches['structure']}, x0 {branches['x0']!r} ({branches['x0_width']} wide), "
            f"{branches['cross_layers']} cross layer(s)"
            + (f", shared entry {branches['entry_nodes']}" if branches["entry_nodes"] else "")
        )
        lines += [f"  violation: {v}" for v in branches["violations"]]
    else:
        lines.append("branches: no cross network found")
    for key, label in (("parameters", "parameters"), ("flops_per_sample", "FLOPs per sample")):
        table = {k: v for k, v in info[key].items() if k not in ("total", "partial")}
        suffix = " (shapes partly unknown: a lower bound)" if info[key].get("partial") else ""
        lines.append(f"{label}: {info[key]['total']:,}" + "".join(f", {k} {v:,}" for k, v in table.items()) + suffix)
    lines.append("precision: " + ", ".join(f"{k} {v} node(s)" for k, v in sorted(info["precision_counts"].items())))
    lines.append(f"Q/DQ nodes: {info['qdq']}")
    return "\n".join(lines)


def inspection_json(info: dict) -> str:
    return json.dumps(info, indent=2)
