"""Faithful half-precision evaluation on CPU: run an FP16/BF16 graph in FP32 with every half tensor rounded
(Cast to half and back) where the graph produced it, as a GPU computing in half would round and overflow.

Why: ONNX Runtime's CPU provider does not compute FP16 graphs in FP16 (it casts around missing kernels and
fuses Cast pairs away), so a graph whose activations overflow half on a GPU can run finite on CPU. The emulated
graph computes each op in FP32 (a GPU accumulates half GEMMs in FP32 too) and rounds its output to the half type,
Inf included; it must run with graph optimisations off so the rounding casts stay.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HALF_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
_HALF = set(HALF_TYPES.values())


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor shape inference can type: inputs, initializers, intermediates, outputs."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.input, *graph.value_info, *graph.output]}
    types.update({init.name: init.data_type for init in graph.initializer})
    return types


def half_type_of(model: onnx.ModelProto) -> int | None:
    """The half type (TensorProto.FLOAT16 or BFLOAT16) the graph computes in, or None for a graph without one."""
    found = {t for t in tensor_types(model).values() if t in _HALF}
    for node in model.graph.node:
        if node.op_type == "Cast":
            found.update(a.i for a in node.attribute if a.name == "to" and a.i in _HALF)
    if len(found) > 1:
        return TensorProto.FLOAT16  # mixed graphs round each tensor to its own type; report the narrower range
    return found.pop() if found else None


def _float_value(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)


def emulate_half(model: onnx.ModelProto) -> onnx.ModelProto:
    """The FP32 emulation graph of a half-precision `model`: same inputs and outputs by name, FP32 where the
    original had half at its edges (inputs are rounded to half on entry)."""
    types = tensor_types(model)
    graph = model.graph
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    del g.node[:], g.value_info[:], g.initializer[:]
    g.initializer.extend(_float_value(i) if i.data_type in _HALF else i for i in graph.initializer)

    def rounding(name: str, half: int, source: str) -> list[onnx.NodeProto]:
        return [
            helper.make_node("Cast", [source], [f"{name}__half"], name=f"{name}__to_half", to=half),
            helper.make_node("Cast", [f"{name}__half"], [name], name=f"{name}__to_float", to=TensorProto.FLOAT),
        ]

    entry = {}  # half graph inputs are fed as float32 and rounded on entry; readers read the rounded copy
    for value in g.input:
        half = value.type.tensor_type.elem_type
        if half in _HALF:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
            entry[value.name] = f"{value.name}__rounded"
            g.node.extend(rounding(entry[value.name], half, value.name))

    for node in graph.node:
        node = _copy(node)
        for k, name in enumerate(node.input):
            node.input[k] = entry.get(name, name)
        if node.op_type == "Cast":
            half = next((a.i for a in node.attribute if a.name == "to"), None)
            if half in _HALF:
                _set_attr(node, "to", TensorProto.FLOAT)
                source = node.output[0] + "__exact"
                final = node.output[0]
                node.output[0] = source
                g.node.extend([node, *rounding(final, half, source)])
                continue
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in _HALF:
                attr.t.CopyFrom(_float_value(attr.t))
        rounded = []
        for k, name in enumerate(node.output):
            if name and types.get(name) in _HALF:
                node.output[k] = name + "__exact"
                rounded += rounding(name, types[name], node.output[k])
        g.node.extend([node, *rounded])

    for value in g.output:
        if value.type.tensor_type.elem_type in _HALF:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    return out


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _set_attr(node: onnx.NodeProto, name: str, value: int) -> None:
    for attr in node.attribute:
        if attr.name == name:
            attr.i = value


def emulated_half_session(model: onnx.ModelProto, dtype: str | None = None):
    """An ONNX Runtime CPU session over emulate_half(model), graph optimisations off so the rounding stays.

    `dtype` ("fp16" / "bf16"), when given, must be the half type the graph computes in. Feed float32 for half
    inputs; half outputs come back as float32 holding half values.
    """
    from toolkit.backends.ort.loader import OrtOptions, ort_session
    from toolkit.core.errors import DcncError

    if dtype is not None:
        if dtype not in HALF_TYPES:
            raise DcncError(f"half emulation dtype must be one of {list(HALF_TYPES)}, got {dtype!r}")
        found = half_type_of(model)
        if found is not None and found != HALF_TYPES[dtype]:
            raise DcncError(f"the graph computes in {onnx.TensorProto.DataType.Name(found)}, not {dtype}")
    return ort_session(emulate_half(model), options=OrtOptions(opt_level="disable"), where="half emulation")


def run_emulated(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name of `model` run under half emulation (float feeds are passed as float32)."""
    session = emulated_half_session(model)
    prepared = {
        name: value.astype(np.float32) if value.dtype in (np.float16, np.float64) else value
        for name, value in feeds.items()
    }
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, prepared)))
