"""FP16 / BF16 lowering: convert a tower's graph to half precision with FP32 inputs and outputs, keeping in FP32
the nodes whose activations leave the half type's safe range on calibration data, and the output tail.

TensorRT 11 takes precision from the graph, so this is where a tower's precision is decided. Cross layers
grow as a polynomial of degree l+1 in x0 and are the usual overflow; which of them overflow is measured, not
guessed: calibration inputs run through the FP32 graph, and a node stays FP32 when the largest |value| it reads
or writes exceeds max_finite(type) / headroom. Without calibration data the conservative default keeps the
whole cross branch and everything reading its output (the head) in FP32, and lowers the rest.

Casts go only where precision changes, one per tensor and direction, so two adjacent FP32 nodes never talk
through a half round trip (onnxruntime's float16 converter inserts such trips, and they overflow just the same).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes import common as ir_passes

from graphs.branches import analyze
from graphs.emulation import HALF_TYPES
from graphs.passes.cleanup import with_nodes
from toolkit.core.errors import DcncError, first_line
from toolkit.core.lowering import METADATA_KEY, HalfLowering
from toolkit.core.onnxio import set_metadata

MAX_FINITE = {"fp16": 65504.0, "bf16": 3.3895314e38}
MATMUL_OPS = {"Gemm", "MatMul", "Conv", "Einsum"}


def _node_names(model: onnx.ModelProto) -> list[str]:
    return [n.name or f"{n.op_type}#{i}" for i, n in enumerate(model.graph.node)]


def _output_tail(model: onnx.ModelProto) -> set[int]:
    """Nodes between the last Gemm/MatMul and a graph output (sigmoid, normalisation, squeeze)."""
    producer = {t: i for i, n in enumerate(model.graph.node) for t in n.output if t}
    tail, stack = set(), [producer[o.name] for o in model.graph.output if o.name in producer]
    while stack:
        i = stack.pop()
        node = model.graph.node[i]
        if i in tail or node.op_type in MATMUL_OPS:
            continue
        tail.add(i)
        stack += [producer[t] for t in node.input if t in producer]
    return tail


def _tied_inputs(node: onnx.NodeProto, opset: int) -> list[bool]:
    """Per input, whether its schema type is that of an output, so it must follow the node into half."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return [False] * len(node.input)
    out_types = {o.type_str for o in schema.outputs}
    formals = list(schema.inputs)
    return [bool(formals) and formals[min(k, len(formals) - 1)].type_str in out_types for k in range(len(node.input))]


def _half_capable(node: onnx.NodeProto, opset: int, dtype: str) -> str | None:
    """A reason the node cannot compute in `dtype` under ONNX's schema, or None."""
    if node.domain not in ("", "ai.onnx"):
        return f"custom-domain op {node.domain}::{node.op_type}"
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return "has a subgraph"
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return f"no ONNX schema for {node.op_type} at opset {opset}"
    type_name = {"fp16": "tensor(float16)", "bf16": "tensor(bfloat16)"}[dtype]
    for constraint in schema.type_constraints:
        allowed = set(constraint.allowed_type_strs)
        if "tensor(float)" in allowed and type_name not in allowed:
            return f"{node.op_type} has no {type_name} in ONNX opset {schema.since_version}"
    return None


def _blocked(
    model: onnx.ModelProto, dtype: str, ranges: dict[str, float] | None, headroom: float
) -> tuple[dict[int, str], dict[str, float]]:
    nodes = model.graph.node
    names = _node_names(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    limit = MAX_FINITE[dtype] / headroom
    weights = {i.name: i for i in model.graph.initializer}
    blocked: dict[int, str] = {}
    peaks: dict[str, float] = {}
    for i in _output_tail(model):
        blocked[i] = "output tail (sigmoid / normalisation) stays FP32"
    if ranges is None:
        report = analyze(model)
        cross = set(report.cross_nodes) | set(report.entry_nodes)
        for i, name in enumerate(names):
            if name in cross:
                blocked.setdefault(i, "no calibration data: cross branch (grows as a polynomial of x0)")
            elif name in report.head_nodes:
                blocked.setdefault(i, "no calibration data: reads the cross branch's output")
    for i, node in enumerate(nodes):
        reason = _half_capable(node, opset, dtype)
        if reason:
            blocked.setdefault(i, reason)
        if ranges is not None:
            peak = max((ranges.get(t, 0.0) for t in [*node.input, *node.output] if t), default=0.0)
            if peak > limit:
                blocked.setdefault(i, f"activation max |x| = {peak:.3g} exceeds the {dtype} safe range {limit:.3g}")
                peaks[names[i]] = peak
        for t in node.input:
            if t in weights and weights[t].data_type == TensorProto.FLOAT:
                w = numpy_helper.to_array(weights[t])
                if w.size and float(np.abs(w).max()) > MAX_FINITE[dtype]:
                    blocked.setdefault(i, f"weight {t} exceeds the {dtype} range")
    return blocked, peaks


def _to_half_tensor(tensor: onnx.TensorProto, dtype: str, name: str) -> onnx.TensorProto:
    import ml_dtypes  # ships with onnx

    value = numpy_helper.to_array(tensor).astype(np.float32)
    return numpy_helper.from_array(value.astype(np.float16 if dtype == "fp16" else ml_dtypes.bfloat16), name)


def lower_half(
    model: onnx.ModelProto,
    dtype: str = "fp16",
    peaks: dict[str, float] | None = None,
    samples: int | None = None,
    headroom: float = 8.0,
) -> tuple[onnx.ModelProto, HalfLowering]:
    """`model` lowered to `dtype` ("fp16" or "bf16") with FP32 inputs and outputs, and the record of what stayed
    FP32 and why (also in the graph's metadata, key dcnc.lowering).

    peaks: the largest |value| of each float tensor of the FP32 graph on calibration data (calibration.ranges
    RangeSet.peaks()), which chooses the block list; None for the conservative default (cross branch and head
    FP32). samples: how many calibration rows the peaks come from, for the record. headroom: a node stays FP32
    when a value it reads or writes exceeds max_finite / headroom (8 by default: 8188 for fp16)."""
    if dtype not in HALF_TYPES:
        raise DcncError(f"--precision must be one of {list(HALF_TYPES)} for half lowering, got {dtype!r}")
    graph = ir.serde.deserialize_model(model)
    ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(graph)
    model = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(graph))
    blocked, kept_peaks = _blocked(model, dtype, peaks, headroom)
    lowered, half_nodes, casts = _rewrite(model, dtype, blocked)
    names, floats = _node_names(model), _float_types(model)
    record = HalfLowering(
        dtype,
        half_nodes=half_nodes,
        kept_fp32={
            names[i]: reason
            for i, reason in sorted(blocked.items())
            if any(t in floats for t in model.graph.node[i].output)
        },
        casts_inserted=casts,
        calibration=None
        if peaks is None
        else {"samples": samples, "limit": MAX_FINITE[dtype] / headroom, "max_abs": kept_peaks},
    )
    set_metadata(lowered, METADATA_KEY, record.to_dict())
    try:
        onnx.checker.check_model(lowered)
        lowered = onnx.shape_inference.infer_shapes(lowered, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise DcncError(f"{dtype} lowering produced an invalid graph ({first_line(err)})") from None
    return lowered, record


def _float_types(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    values = [*g.input, *g.value_info, *g.output]
    floats = {v.name for v in values if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    return floats | {i.name for i in g.initializer if i.data_type == TensorProto.FLOAT}


def _rewrite(model: onnx.ModelProto, dtype: str, blocked: dict[int, str]) -> tuple[onnx.ModelProto, int, int]:
    """Rebuild the graph: half nodes read half tensors, FP32 nodes FP32 ones, Casts only at the boundary."""
    half = HALF_TYPES[dtype]
    floats = _float_types(model)
    weights = {i.name: i for i in model.graph.initializer}
    graph_outputs = {o.name for o in model.graph.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    half_tensors: set[str] = set()  # produced in half by a lowered node
    in_half: dict[str, str] = {}  # graph output -> the half tensor it is cast from
    converted: dict[tuple[str, int], str] = {}  # (tensor, target type) -> its cast / converted copy
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    casts = half_nodes = 0

    def as_type(tensor: str, target: int) -> str:
        nonlocal casts
        key = (tensor, target)
        if key not in converted:
            suffix = "fp32" if target == TensorProto.FLOAT else dtype
            converted[key] = f"{tensor}__{suffix}"
            if tensor in weights:
                new_inits.append(_to_half_tensor(weights[tensor], dtype, converted[key]))
            else:
                new_nodes.append(helper.make_node("Cast", [tensor], [converted[key]], name=f"{tensor}__cast_{suffix}", to=target))
                casts += 1
        return converted[key]

    for i, source in enumerate(model.graph.node):
        node = onnx.NodeProto()
        node.CopyFrom(source)
        lowered = i not in blocked and any(t in floats for t in node.output)
        tied = _tied_inputs(node, opset)
        if lowered:
            half_nodes += 1
            for k, t in enumerate(node.input):
                if t in in_half:  # a graph output computed in half: read the half tensor, not its FP32 copy
                    node.input[k] = t = in_half[t]
                if t in floats and tied[k] and t not in half_tensors:
                    node.input[k] = as_type(t, half)
            if node.op_type == "Cast":
                for a in node.attribute:
                    if a.name == "to" and a.i == TensorProto.FLOAT:
                        a.i = half
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(_to_half_tensor(a.t, dtype, a.t.name))
            outputs = []
            for k, t in enumerate(node.output):
                if t in floats:
                    if t in graph_outputs:  # FP32 at the edge: compute in half, cast out under the output's name
                        node.output[k] = in_half[t] = f"{t}__{dtype}"
                        outputs.append(helper.make_node("Cast", [node.output[k]], [t], name=f"{t}__cast_out", to=TensorProto.FLOAT))
                        casts += 1
                    half_tensors.add(node.output[k])
            new_nodes += [node, *outputs]
        else:
            reads_half = [k for k, t in enumerate(node.input) if t in half_tensors]
            computes_float = any(t in floats for t in node.output)
            mixed = any(t in floats and t not in half_tensors for t in node.input if t)
            if reads_half and (computes_float or mixed):
                for k in reads_half:
                    node.input[k] = as_type(node.input[k], TensorProto.FLOAT)
            new_nodes.append(node)

    out = with_nodes(model, new_nodes, new_inits)
    del out.graph.value_info[:]  # the types changed: shape inference writes them anew
    return out, half_nodes, casts
