"""Bias correction: the mean shift INT8 puts on each quantized Gemm's output, measured on calibration data and
folded into the Gemm's FP32 bias (Nagel et al., "Data-Free Quantization", 2019, empirical form).

Rounding weights and inputs is unbiased only on average over many values; a Gemm with few inputs, 7-bit
weights or a clipped input range shifts some output channels by a constant, and the layers after it (a ReLU,
the next cross layer's product) turn that shift into error. The shift of channel c is mean(y_fp32 - y_int8)
over the calibration rows, with y_int8 the Gemm's output in the Q/DQ graph run without fusions (the same
arithmetic in float); adding it to the bias before quantizing again removes it. All Gemms are corrected at once,
so each shift includes what the Gemms before it passed on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from calibration.ranges import channel_means


@dataclass
class BiasRecord:
    """Per corrected Gemm: the largest |shift| folded into its bias, relative to the largest |bias| (0 when the
    bias was zero)."""

    shifts: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def correct_biases(model, quantize: Callable, batches: Callable[[], Iterator[dict[str, np.ndarray]]]):
    """`model` (onnx.ModelProto, not modified) with each Gemm's mean INT8 output shift added to its bias, and a
    BiasRecord. quantize: FP32 graph -> its Q/DQ graph (the lowering being corrected). batches: calibration
    data, a zero-argument callable returning feed dicts. Gemms without a constant bias, or left in float by
    `quantize`, are not changed."""
    import onnx
    from onnx import numpy_helper

    initializers = {init.name for init in model.graph.initializer}
    gemms = [node for node in model.graph.node if node.op_type == "Gemm" and len(node.input) > 2
             and node.input[1] in initializers and node.input[2] in initializers]  # fmt: skip
    quantized = quantize(model)
    quantized_nodes = {node.name: node for node in quantized.graph.node}
    weight_readers = _dequantized(quantized)
    gemms = [g for g in gemms if g.name in quantized_nodes and quantized_nodes[g.name].input[1] in weight_readers]
    record = BiasRecord()
    if not gemms:
        return model, record
    reference = channel_means(model, [g.output[0] for g in gemms], batches)
    taps = {g.name: quantized_nodes[g.name].output[0] for g in gemms}
    shifted = channel_means(quantized, list(taps.values()), batches)
    corrected = onnx.ModelProto()
    corrected.CopyFrom(model)
    biases = {init.name: init for init in corrected.graph.initializer}
    for gemm in gemms:
        shift = reference[gemm.output[0]] - shifted[taps[gemm.name]]
        bias = biases[gemm.input[2]]
        value = numpy_helper.to_array(bias)
        bias.CopyFrom(numpy_helper.from_array((value + shift).astype(value.dtype), bias.name))
        peak = float(np.abs(value).max())
        record.shifts[gemm.name] = round(float(np.abs(shift).max()) / peak, 6) if peak > 0 else 0.0
    return corrected, record


def _dequantized(model) -> set[str]:
    """Tensors written by a DequantizeLinear: a Gemm reading its weight from one is quantized."""
    return {node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
