"""INT8 Q/DQ insertion for a target (x86 CPU under onnxruntime, or TensorRT) from calibrated activation ranges.

Q/DQ insertion is onnxruntime.quantization's quantize_static; what dcnc decides is what it is fed:

- the ranges, collected by calibration.ranges (real 2048-bin histograms) and handed over as a calibration
  cache, so quantize_static never runs its own calibration;
- the target's number formats (TARGETS): for `cpu`, uint8 activations and int8 weights (U8S8), so ORT fuses
  every DQ -> Gemm -> Q into an integer QGemm (signed int8 activations leave most Gemms dequantized to
  float), with 7 or 8-bit weights as the ISA level allows (`reduce_range`, calibration.isa); for
  `tensorrt`, symmetric int8 activations, per-channel symmetric weights and float biases;
- which ops carry Q/DQ (see `TargetConfig.op_types`) and the cross layers' path (`cross_path`): "integer" runs
  their product x0 * (W x + b) and residual add on uint8 (QLinearMul / QLinearAdd), with the skip path's
  tensors kept at their full minmax range (a clipped skip connection clips every layer after it); "float"
  leaves every Mul / Add in float, so only the Gemms read quantized copies of their inputs;
- that a node left in float reads the exact tensor, not its dequantized copy (`float_readers_read_float`:
  quantize_static rewires every reader of a quantized tensor, so the TensorRT target's product and residual
  would otherwise read int8-rounded x0);
- where the integer chain ends (`float_exit_gemms`): a Gemm whose output only float ops read (the head before
  the L2 norm, a ranker's logit) writes float, not uint8 then dequantized.

Speed is bounded by the Gemms' share of the time and the U8S8 / FP32 MatMul throughput ratio of the CPU's
ISA level: docs/int8.md has the counting.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration.ranges import RangeSet
from toolkit.core.errors import DcncError

TARGETS = ("cpu", "tensorrt")
WEIGHT_OPS = ("Gemm", "MatMul")
EMBEDDING_OPS = ("Gather",)
CROSS_PATHS = ("integer", "float")


@dataclass(frozen=True)
class TargetConfig:
    """How a target runs INT8.

    op_types: ops given Q/DQ. For `cpu` the elementwise ops between Gemms (the cross layer's Mul and residual
    Add, ReLU, Concat) are quantized too, so tensors stay uint8 from one QGemm to the next (QLinearMul,
    QLinearAdd) instead of being dequantized and requantized around every float op. For `tensorrt` only Gemm
    / MatMul inputs get Q/DQ and outputs stay float: TensorRT fuses DQ into the GEMM and runs the bias, the
    product and the residual add in its epilogue at higher precision. quantize_outputs: Gemm outputs carry
    Q/DQ where an integer op reads them (see `float_exit_gemms` for where none does).
    """

    activation_type: str  # "uint8" | "int8"
    weight_type: str
    per_channel: bool
    reduce_range: bool
    symmetric_activations: bool
    quantize_bias: bool
    op_types: tuple[str, ...]
    quantize_outputs: bool


TARGET_CONFIGS = {
    "cpu": TargetConfig("uint8", "int8", per_channel=True, reduce_range=True, symmetric_activations=False,
                        quantize_bias=True, op_types=(*WEIGHT_OPS, "Mul", "Add", "Relu", "Concat"),
                        quantize_outputs=True),
    "tensorrt": TargetConfig("int8", "int8", per_channel=True, reduce_range=False, symmetric_activations=True,
                             quantize_bias=False, op_types=WEIGHT_OPS, quantize_outputs=False),
}  # fmt: skip


def check_target(target: str) -> TargetConfig:
    if target not in TARGET_CONFIGS:
        raise DcncError(f"--target must be one of {list(TARGETS)}, got {target!r}")
    return TARGET_CONFIGS[target]


def quantizable_nodes(model, target: str = "cpu", quantize_embeddings: bool = False) -> list[str]:
    """Names of the nodes INT8 applies to for `target`, in graph order: the target's op types, where Gemm and
    MatMul need a constant weight (attention's activation x activation MatMuls stay float), and with
    `quantize_embeddings`, Gathers from a constant table."""
    config = check_target(target)
    constants = {init.name for init in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS and node.op_type in config.op_types:
            if node.input[1] in constants:
                names.append(node.name)
        elif node.op_type in config.op_types or (quantize_embeddings and node.op_type in EMBEDDING_OPS):
            if node.op_type not in EMBEDDING_OPS or node.input[0] in constants:
                names.append(node.name)
    return names


def cross_nodes(model) -> tuple[list, list]:
    """The cross layers' products of two activations (x0 * (W x + b)) and residual Adds (an Add of two
    activations, one computed from the other), as node lists in graph order."""
    producer = {out: node for node in model.graph.node for out in node.output}
    constants = {init.name for init in model.graph.initializer} | {
        out for node in model.graph.node if node.op_type == "Constant" for out in node.output
    }

    def ancestors(tensor: str) -> set[str]:
        seen, stack = set(), [tensor]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in producer:
                stack.extend(producer[name].input)
        return seen

    products, residuals = [], []
    for node in model.graph.node:
        activations = [t for t in node.input if t and t not in constants]
        if len(activations) != 2 or node.op_type not in ("Add", "Mul"):
            continue
        a, b = activations
        if node.op_type == "Mul":
            products.append(node)
        elif a in ancestors(b) or b in ancestors(a):
            residuals.append(node)
    return products, residuals


def unclipped_tensors(model) -> set[str]:
    """Tensors that keep their minmax range whatever the method: both inputs and the output of every residual
    Add and the output of every product of two activations (the cross layer's x0 * (W x + b)), since clipping
    them clips the skip path."""
    products, residuals = cross_nodes(model)
    keep = {out for node in products for out in node.output}
    for node in residuals:
        keep.update([*node.input, *node.output])
    return keep


def float_cross_nodes(model, op_types) -> list[str]:
    """The nodes the float cross path leaves in float: every elementwise Mul and Add (the cross layers'
    products and residual adds, diag_scale terms, mixture gates, DCNv1 biases), and each Concat of `op_types`
    whose output one of them reads (x0: the Gemms reading it get their own Q/DQ pair)."""
    chosen = {node.name for node in model.graph.node if node.op_type in ("Mul", "Add")}
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    for node in reversed(model.graph.node):  # readers come after producers: one backward sweep reaches x0
        if node.op_type == "Concat" and "Concat" in op_types:
            if any(reader in chosen for out in node.output for reader in readers.get(out, [])):
                chosen.add(node.name)
    return [node.name for node in model.graph.node if node.name in chosen]


def float_readers_read_float(model, quantized_nodes) -> None:
    """In place: a node left in float that reads the dequantized copy of a tensor made by a float op (or a graph
    input, or a lookup) reads the tensor itself, so only the quantized readers see its 8-bit rounding: one Q/DQ
    pair per quantized consumer, and the cross layer's product x0 * (W x + b) and residual add read exact x0 and
    x_l (quantize_static rewires every reader of a quantized tensor to its DQ). A tensor made by a quantized
    node keeps its DQ: at run time its float value does not exist (the QGemm writes uint8)."""
    quantized_nodes = set(quantized_nodes)
    producer = {out: node for node in model.graph.node for out in node.output}
    float_readers = [n for n in model.graph.node
                     if n.name not in quantized_nodes and n.op_type not in ("QuantizeLinear", "DequantizeLinear")]  # fmt: skip
    for dequantize in model.graph.node:
        quantize = producer.get(dequantize.input[0]) if dequantize.op_type == "DequantizeLinear" else None
        if quantize is None or quantize.op_type != "QuantizeLinear":
            continue
        source = quantize.input[0]
        made_by = producer.get(source)
        if made_by is not None and made_by.name in quantized_nodes and made_by.op_type not in EMBEDDING_OPS:
            continue
        for reader in float_readers:
            reader.input[:] = [source if name == dequantize.output[0] else name for name in reader.input]
    _drop_unread_qdq(model)


def _drop_unread_qdq(model) -> None:
    """Remove Q/DQ nodes whose outputs nothing reads, and the scales and zero points left unused."""
    graph = model.graph
    while True:
        read = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
        unread = [n for n in graph.node
                  if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not set(n.output) & read]  # fmt: skip
        if not unread:
            break
        for node in unread:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)


def quantize_with_ranges(
    model,
    ranges: RangeSet,
    target: str = "cpu",
    keep_fp32: Iterable[str] = (),
    quantize_embeddings: bool = False,
    reduce_range: bool | None = None,
    cross_path: str = "integer",
):
    """The Q/DQ graph of `model` (onnx.ModelProto) for `target`, nodes in `keep_fp32` left in float.

    reduce_range: 7-bit weights (None: the target's default). cross_path: "integer" runs the cross layers'
    product and residual add on uint8 (QLinearMul / QLinearAdd, skip path unclipped); "float" leaves them in
    float and quantizes only what the Gemms read (see `float_cross_nodes`).
    Returns (quantized onnx.ModelProto, names of the quantized nodes). Raises DcncError when `keep_fp32`
    names a node the graph does not have.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.calibrate import (
        TensorData,
        TensorsData,
        save_tensors_data,
    )

    config = check_target(target)
    keep_fp32 = list(keep_fp32)
    node_names = {node.name for node in model.graph.node}
    unknown = [n for n in keep_fp32 if n not in node_names]
    if unknown:
        raise DcncError(f"keep-fp32: the graph has no node {unknown[0]!r}")
    candidates = quantizable_nodes(model, target, quantize_embeddings)
    chosen = set(candidates)
    if not any(node.op_type in WEIGHT_OPS for node in model.graph.node if node.name in chosen):
        raise DcncError("int8: the graph has no Gemm/MatMul with a constant weight to quantize")
    if cross_path not in CROSS_PATHS:
        raise DcncError(f"cross path must be one of {list(CROSS_PATHS)}, got {cross_path!r}")
    in_float = float_cross_nodes(model, config.op_types) if cross_path == "float" else []
    # the skip path is quantized only where the cross layers run on uint8; elsewhere it reads float (below)
    skip_path = unclipped_tensors(model) if cross_path == "integer" and "Add" in config.op_types else set()
    data = {}
    for name, calibrated in ranges.calibrated.items():
        low, high = ranges.minmax[name] if name in skip_path else calibrated
        data[name] = TensorData(lowest=np.array(low, dtype=np.float32), highest=np.array(high, dtype=np.float32))
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    op_types = list(config.op_types) + (list(EMBEDDING_OPS) if quantize_embeddings else [])
    extra_options = {
        "ActivationSymmetric": config.symmetric_activations,
        "WeightSymmetric": True,
        "QuantizeBias": config.quantize_bias,
        "MatMulConstBOnly": True,
        # a ReLU stays in the graph (ORT folds it into the QGemm's output range): dropped, as by default,
        # its clamp would live only in a Q/DQ pair that float_exit_gemms may remove
        "QDQKeepRemovableActivations": True,
        "OpTypesToExcludeOutputQuantization": [] if config.quantize_outputs else list(WEIGHT_OPS),
    }
    with tempfile.TemporaryDirectory(prefix="dcnc-int8-") as tmp, _quiet_quantizer():
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
        out = Path(tmp) / "int8.onnx"
        try:
            quantize_static(
                model,
                out,
                None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=op_types,
                per_channel=config.per_channel,
                reduce_range=config.reduce_range if reduce_range is None else reduce_range,
                activation_type=types[config.activation_type],
                weight_type=types[config.weight_type],
                nodes_to_exclude=[*keep_fp32, *in_float],
                calibrate_method=CalibrationMethod.MinMax,
                extra_options=extra_options,
                calibration_cache_path=cache,
            )
        except (ValueError, KeyError, RuntimeError) as err:
            raise DcncError(f"int8: onnxruntime could not quantize the graph ({err})") from None
        quantized = onnx.load(out)
    kept = set(keep_fp32) | set(in_float)
    quantized_nodes = [n for n in candidates if n not in kept]
    float_readers_read_float(quantized, quantized_nodes)
    if config.quantize_outputs:
        float_exit_gemms(quantized)
    return quantized, quantized_nodes


def float_exit_gemms(model) -> list[str]:
    """Give each Gemm / MatMul whose quantized output only float ops read a float output, in place.

    quantize_static quantizes every Gemm output, so where the integer chain ends (the head Gemm before the L2
    norm, a ranker's logit, a Gemm before a node kept in FP32) the graph reads Gemm -> Q -> DQ -> float op:
    ONNX Runtime then runs a QGemm that rounds to uint8 and a DequantizeLinear right after, once per float
    reader. Dropping that Q -> DQ pair lets it fuse a QGemm that writes float directly: one pass over the
    output fewer and no 8-bit rounding of the tower's output. A pair stays where any reader of the DQ is itself
    quantized (its outputs feed a QuantizeLinear), and after a MatMul whose weight is not 2-D (a mixture's
    batched experts): ORT would fuse it into a MatMulIntegerToFloat, which refuses per-channel batched weights.
    Returns the names of the Gemms changed.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    shapes = {init.name: len(init.dims) for init in graph.initializer}

    def matrix_weight(gemm) -> bool:
        weight = producer.get(gemm.input[1])
        source = weight.input[0] if weight is not None and weight.op_type == "DequantizeLinear" else gemm.input[1]
        return gemm.op_type == "Gemm" or shapes.get(source) == 2
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {value.name for value in graph.output}

    def integer(node) -> bool:
        return any(r.op_type == "QuantizeLinear" for out in node.output for r in readers.get(out, []))

    changed, dropped = [], []
    for quantize in graph.node:
        gemm = producer.get(quantize.input[0]) if quantize.op_type == "QuantizeLinear" else None
        if gemm is None or gemm.op_type not in WEIGHT_OPS or len(readers[quantize.input[0]]) != 1:
            continue
        if not matrix_weight(gemm):
            continue
        dequantizes = readers.get(quantize.output[0], [])
        if not dequantizes or any(d.op_type != "DequantizeLinear" for d in dequantizes):
            continue
        if any(integer(r) for d in dequantizes for r in readers.get(d.output[0], [])):
            continue
        # the Gemm takes over the dequantized name if it is a graph output (the interface keeps its names)
        exits = [d.output[0] for d in dequantizes if d.output[0] in graph_outputs]
        if len(exits) > 1:
            continue
        name = exits[0] if exits else gemm.output[0]
        gemm.output[0] = name
        for d in dequantizes:
            for reader in readers.get(d.output[0], []):
                reader.input[:] = [name if i == d.output[0] else i for i in reader.input]
        dropped.extend([quantize, *dequantizes])
        changed.append(gemm.name)
    for node in dropped:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)  # the dropped pair's scale and zero point
    return changed


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime.quantization logs advice ("consider pre-processing") on the root logger at WARNING."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
