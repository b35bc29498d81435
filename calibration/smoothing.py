"""Outlier smoothing: per-channel scales moved from Gemm inputs into their weights (SmoothQuant), as an FP32 graph
that computes what the original computes.

One uint8 scale per activation tensor loses the small channels of a Gemm input whose channels differ widely in
range: dense features beside small embeddings in x0, the cross layers' polynomial growth, the cross output beside
the MLP's in the head. SmoothQuant divides input channel j by s_j = a_j^alpha / w_j^(1 - alpha) (a_j its
calibrated peak, w_j the peak of the weights it multiplies) and multiplies the weights that read it by s_j.

Where the division happens decides what it costs: an explicit Mul before a Gemm is one more elementwise pass
(measured on the example two-tower at batch 4096: about as long as the Gemm it serves), so it is folded into
what produces the tensor and carried through every op that commutes with a per-channel scale. The tensors that
share one scale vector form a region:

- seeds: a Gemm's output (its weight rows and bias divided by s), or a Concat of embedding lookups and graph
  inputs (x0: table columns divided by s; a graph input gets a Mul, one pass over the narrow dense features);
- carried through: Relu; Unsqueeze / ReduceSum off the last axis; Mul by an unscaled tensor (x0 * (W x + b));
  Add of two tensors with the same scales (the residual) or of a constant (divided by s); Concat on the last axis;
- absorbed by: Gemm / MatMul reading it as the input of a constant weight (the weight's rows times s).

So the whole DCNv2 cross network is one region, x_{l+1}/s = (x0/s) * (W diag(s) (x_l/s) + b) + x_l/s, and an MLP
layer's output is one too. A region any of whose tensors reaches another op (a graph output, an Add with an
unscaled activation, a diag_scale term, ...) is left unsmoothed: smoothing never changes what the graph computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

ALPHAS = (0.25, 0.5, 0.75, 1.0)  # migration strengths tried per region (0: none moves, 1: all)
SAMPLE_ROWS = 1024  # calibration rows the quantization error of each choice is measured on

Segment = tuple[bool, int, int]  # (scaled by the region, its first channel in the region, width)


@dataclass
class Region:
    """Tensors sharing one per-channel scale vector, from a seed to the Gemms that absorb it."""

    seed: str  # the node whose output (Gemm) or inputs (Concat) take the division
    width: int
    layouts: dict[str, list[Segment]] = field(default_factory=dict)  # tensor -> which of its channels are scaled
    absorbers: list[str] = field(default_factory=list)  # Gemm / MatMul nodes multiplying their weights by s
    constants: list[tuple[str, str]] = field(default_factory=list)  # (Add node, constant input) divided by s
    failure: str | None = None


@dataclass
class SmoothingRecord:
    """What smoothing did, for the lowering record: per region smoothed, its seed, the Gemms absorbing its
    scales, the alpha chosen and the relative quantization error of those Gemms' outputs before and after; per
    region left alone, why."""

    weight_levels: int
    smoothed: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    inserted: list[str] = field(default_factory=list)  # Muls dividing graph inputs: to stay float, before any Q

    @property
    def gemms(self) -> list[str]:
        return [gemm for region in self.smoothed for gemm in region["absorbers"]]

    def to_dict(self) -> dict:
        return asdict(self)


def smooth_outliers(model, batches: Callable[[], Iterator[dict[str, np.ndarray]]], weight_levels: int = 127,
                    alphas: tuple[float, ...] = ALPHAS):  # fmt: skip
    """The smoothed FP32 graph of `model` (onnx.ModelProto, not modified) and its SmoothingRecord.

    batches: calibration data, a zero-argument callable returning feed dicts (one pass collects channel ranges
    and SAMPLE_ROWS rows of every Gemm input). weight_levels: the int8 weights' largest level (127, or 63 with
    reduce_range). Each region takes the alpha of `alphas` whose scales give its Gemms' outputs the least
    quantization error (uint8 per-tensor inputs, per-channel symmetric weights, simulated on the sampled rows),
    and stays as it is when none beats no smoothing.
    """
    import onnx

    from calibration.ranges import channel_stats

    graph = _Graph(model)
    record = SmoothingRecord(weight_levels)
    regions = []
    for region in (graph.region(node) for node in model.graph.node):
        if region is not None and region.failure:
            record.skipped.append({"seed": region.seed, "reason": region.failure})
        elif region is not None and region.absorbers:
            regions.append(region)
    inputs = sorted({graph.node[a].input[0] for r in regions for a in r.absorbers})
    stats = channel_stats(model, inputs, batches, SAMPLE_ROWS) if inputs else None
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    editor = _Editor(smoothed)
    for region in regions:
        activation, weights = _region_peaks(region, graph, stats)
        usable = (activation > 0) & (weights > 0)
        errors = {None: _quantization_error(region, graph, stats, np.ones(region.width, np.float32), weight_levels)}
        scales = {}
        for alpha in alphas:
            scale = np.ones(region.width)
            scale[usable] = activation[usable] ** alpha / weights[usable] ** (1.0 - alpha)
            scales[alpha] = scale.astype(np.float32)
            errors[alpha] = _quantization_error(region, graph, stats, scales[alpha], weight_levels)
        best = min(errors, key=lambda a: errors[a])
        entry = {"seed": region.seed, "absorbers": region.absorbers, "error_before": round(errors[None], 6)}
        if best is None:
            record.skipped.append(entry | {"reason": "no alpha lowers its Gemms' quantization error"})
            continue
        editor.apply(region, graph, scales[best])
        record.smoothed.append(entry | {"alpha": best, "error_after": round(errors[best], 6)})
    record.inserted = editor.finish()
    return smoothed, record


def _region_peaks(region: Region, graph: _Graph, stats) -> tuple[np.ndarray, np.ndarray]:
    """Per region channel: the largest |activation| over the Gemm inputs of the region, and the largest
    |weight| it multiplies in the Gemms absorbing it."""
    activation, weights = np.zeros(region.width), np.zeros(region.width)
    for absorber in region.absorbers:
        node = graph.node[absorber]
        tensor = node.input[0]
        rows = np.abs(graph.input_rows(node)).max(axis=1)  # [in] peak over the outputs
        for start, span in _spans(region.layouts[tensor]):
            width = span.stop - span.start
            activation[span] = np.maximum(activation[span], stats.peak(tensor)[start : start + width])
            weights[span] = np.maximum(weights[span], rows[start : start + width])
    return activation, weights


def _quantization_error(region: Region, graph: _Graph, stats, scale: np.ndarray, weight_levels: int) -> float:
    """Sum over the region's Gemms of ||y_int8 - y||^2 / ||y||^2 on the sampled rows, inputs divided and weights
    multiplied by `scale`: uint8 asymmetric per-tensor inputs, symmetric per-column weights."""
    total = 0.0
    for absorber in region.absorbers:
        node = graph.node[absorber]
        tensor = node.input[0]
        vector = _Editor.vector(region.layouts[tensor], scale)
        rows, weight = stats.rows[tensor].astype(np.float64), graph.input_rows(node).astype(np.float64)
        low = min(0.0, float((stats.low[tensor] / vector).min()))
        high = max(0.0, float((stats.high[tensor] / vector).max()))
        step = (high - low) / 255 or 1.0
        zero = np.round(-low / step)
        inputs = (np.clip(np.round(rows / vector / step) + zero, 0, 255) - zero) * step
        scaled = weight * vector[:, None]
        weight_step = np.abs(scaled).max(axis=0) / weight_levels
        weight_step[weight_step == 0] = 1.0
        quantized = np.round(scaled / weight_step) * weight_step
        reference = rows @ weight
        total += float(np.sum((inputs @ quantized - reference) ** 2) / max(np.sum(reference**2), 1e-30))
    return total


def _spans(layout: list[Segment]) -> Iterator[tuple[int, slice]]:
    """(first column in the tensor, the region channels it holds) per scaled segment of a layout."""
    start = 0
    for scaled, first, width in layout:
        if scaled:
            yield start, slice(first, first + width)
        start += width


class _Graph:
    """Read-only views of an ONNX graph that region discovery needs: producers, readers, constants, shapes."""

    def __init__(self, model):
        import onnx
        from onnx import numpy_helper

        self.model = model
        self.node = {node.name: node for node in model.graph.node}
        self.readers: dict[str, list] = {}
        for node in model.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        # weights, biases and tables: initializers (what smoothing rewrites); axes may also come from Constant nodes
        self.initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
        self.constants = dict(self.initializers)
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.outputs = {value.name for value in model.graph.output}
        self.inputs = {value.name for value in model.graph.input} - set(self.initializers)
        inferred = onnx.shape_inference.infer_shapes(model)
        self.shape: dict[str, list] = {}
        for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            dims = value.type.tensor_type.shape.dim
            self.shape[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]

    def width(self, tensor: str) -> int | None:
        shape = self.shape.get(tensor)
        return shape[-1] if shape else None

    def rank(self, tensor: str) -> int | None:
        shape = self.shape.get(tensor)
        return len(shape) if shape is not None else None

    def attribute(self, node, name: str, default):
        from onnx import helper

        for attr in node.attribute:
            if attr.name == name:
                return helper.get_attribute_value(attr)
        return default

    def input_rows(self, node) -> np.ndarray:
        """The constant weight of a Gemm / MatMul as [in, everything else]: row j multiplies input channel j
        (MatMul weights may be 1-D, [in], or batched, [..., in, out])."""
        weight = self.initializers[node.input[1]]
        if node.op_type == "Gemm":
            return weight.T if self.attribute(node, "transB", 0) else weight
        return np.moveaxis(weight, -2, 0).reshape(weight.shape[-2], -1) if weight.ndim > 1 else weight[:, None]

    def weighted(self, node) -> bool:
        """A Gemm / MatMul of an activation by a constant 2-D weight (bias constant or absent)."""
        if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in self.initializers:
            return False
        if node.input[0] in self.constants or (node.op_type == "Gemm" and self.initializers[node.input[1]].ndim != 2):
            return False
        if node.op_type == "Gemm" and (self.attribute(node, "transA", 0) or self.attribute(node, "alpha", 1)
                                       not in (1, 1.0)):  # fmt: skip
            return False
        return len(node.input) < 3 or not node.input[2] or node.input[2] in self.initializers

    def region(self, seed) -> Region | None:
        """The region seeded by `seed` (a weighted Gemm, or a Concat of lookups and inputs), or None when the
        node is no seed. The region carries `failure` when some tensor of it reaches an op that does not
        commute with a per-channel scale."""
        if seed.op_type == "Gemm" and self.weighted(seed):
            width = self.input_rows(seed).shape[1]
            layouts = {seed.output[0]: [(True, 0, width)]}
        elif seed.op_type == "Concat" and self._last_axis(seed, seed.output[0]):
            layouts, width = self._source_layout(seed)
            if layouts is None:
                return None
        else:
            return None
        region = Region(seed.name, width, layouts)
        started = False
        for node in self.model.graph.node:
            if node is seed:
                started = True
                continue
            if not started:
                continue
            scaled = [name for name in node.input if name in region.layouts]
            if scaled:
                reason = self._carry(node, scaled, region)
                if reason:
                    region.failure = f"{node.name} ({node.op_type}): {reason}"
                    return region
        leaving = sorted(set(region.layouts) & self.outputs)
        if leaving:
            region.failure = f"{leaving[0]} is a graph output"
        return region

    def _last_axis(self, node, tensor: str) -> bool:
        rank = self.rank(tensor)
        axis = self.attribute(node, "axis", 0)
        return rank is not None and axis in (-1, rank - 1)

    def _source_layout(self, concat) -> tuple[dict | None, int]:
        """x0's layout: every input a lookup in a constant 2-D table read only here, or a graph input; None if
        another input joins (its scale could not be divided out at its source)."""
        layout, first = [], 0
        for name in concat.input:
            width = self.width(name)
            lookup = next((n for n in self.model.graph.node if name in n.output), None)
            is_table = (lookup is not None and lookup.op_type == "Gather" and lookup.input[0] in self.initializers
                        and self.initializers[lookup.input[0]].ndim == 2 and self.attribute(lookup, "axis", 0) == 0
                        and len(self.readers[lookup.input[0]]) == 1)  # fmt: skip
            if width is None or not (is_table or name in self.inputs) or len(self.readers[name]) != 1:
                return None, 0
            layout.append((True, first, width))
            first += width
        return {concat.output[0]: layout}, first

    def _carry(self, node, scaled: list[str], region: Region) -> str | None:
        """Extend the region through `node` (some of whose inputs carry its scales); a reason if it cannot."""
        layouts = region.layouts
        op = node.op_type
        first = layouts[scaled[0]]
        if op == "Relu":
            layouts[node.output[0]] = first
        elif op in ("Unsqueeze", "ReduceSum"):
            if node.input[0] not in layouts or len(node.input) < 2 or node.input[1] not in self.constants:
                return "axes are not a constant input"
            rank = self.rank(node.input[0] if op == "ReduceSum" else node.output[0])
            axes = {int(a) % rank for a in np.atleast_1d(self.constants[node.input[1]])} if rank else {None}
            if rank is None or rank - 1 in axes:
                return "it moves or reduces the channel axis"
            layouts[node.output[0]] = first
        elif op == "Mul":
            if len(scaled) > 1:
                return "a product of two scaled tensors"
            layouts[node.output[0]] = first
        elif op == "Add":
            other = next((name for name in node.input if name not in layouts), None)
            if other is None and layouts[node.input[0]] == layouts[node.input[1]]:
                layouts[node.output[0]] = first
            elif other is not None and other in self.initializers and self._per_channel(self.initializers[other], node):
                region.constants.append((node.name, other))
                layouts[node.output[0]] = first
            else:
                return "it adds a tensor with other scales"
        elif op == "Concat":
            if not self._last_axis(node, node.output[0]):
                return "it concatenates along another axis than the channels"
            layout = []
            for name in node.input:
                width = self.width(name)
                if name in layouts:
                    layout.extend(layouts[name])
                elif width is None:
                    return f"the width of {name} is unknown"
                else:
                    layout.append((False, 0, width))
            layouts[node.output[0]] = layout
        elif op in ("Gemm", "MatMul") and self.weighted(node) and scaled == [node.input[0]]:
            if op == "MatMul" and self.rank(node.input[0]) is None:
                return "unknown input rank"
            region.absorbers.append(node.name)
        else:
            return "it does not commute with a per-channel scale"
        return None

    def _per_channel(self, constant: np.ndarray, node) -> bool:
        """A constant added to a scaled tensor broadcasts along its channels (shape [..., 1 or C])."""
        width = self.width(node.output[0])
        return constant.ndim <= max(self.rank(node.output[0]) or 1, 1) and (
            constant.ndim == 0 or constant.shape[-1] in (1, width)
        ) and all(d == 1 for d in constant.shape[:-1])  # fmt: skip


class _Editor:
    """Applies regions' scales to a copy of the graph: weights and constants rewritten in place (copied first
    when another node shares them), Muls inserted on graph inputs."""

    def __init__(self, model):
        self.model = model
        self.node = {node.name: node for node in model.graph.node}
        self.initializers = {init.name: init for init in model.graph.initializer}
        self.inserted: dict[str, list] = {}  # Concat node name -> Mul nodes to put before it

    def apply(self, region: Region, graph: _Graph, scale: np.ndarray) -> None:
        seed = self.node[region.seed]
        if seed.op_type == "Gemm":
            trans_b = graph.attribute(seed, "transB", 0)
            self._update(seed, 1, lambda w: w / (scale[:, None] if trans_b else scale[None, :]))
            if len(seed.input) > 2 and seed.input[2]:
                self._update(seed, 2, lambda b: b / scale)
        else:
            self._divide_sources(seed, graph, region.layouts[seed.output[0]], scale)
        for add, constant in region.constants:
            node = self.node[add]
            vector = self.vector(region.layouts[node.output[0]], scale)
            self._update(node, list(node.input).index(constant), lambda c: c / vector)
        for name in region.absorbers:
            node = self.node[name]
            vector = self.vector(region.layouts[node.input[0]], scale)
            trans_b = node.op_type == "Gemm" and graph.attribute(node, "transB", 0)
            self._update(node, 1, lambda w: w * (vector if trans_b or w.ndim == 1 else vector[:, None]))

    def _divide_sources(self, concat, graph: _Graph, layout: list[Segment], scale: np.ndarray) -> None:
        from onnx import helper, numpy_helper

        for position, (name, (_, first, width)) in enumerate(zip(list(concat.input), layout)):
            part = scale[first : first + width]
            if name in graph.inputs:
                divisor = numpy_helper.from_array((1.0 / part).astype(np.float32), f"{concat.name}/smooth/{name}")
                self.model.graph.initializer.append(divisor)
                out = f"{name}_smoothed"
                mul = helper.make_node("Mul", [name, divisor.name], [out], name=f"{concat.name}/Smooth_{position}")
                self.inserted.setdefault(concat.name, []).append(mul)
                concat.input[position] = out
            else:
                lookup = next(n for n in self.model.graph.node if name in n.output)
                self._update(lookup, 0, lambda table: table / part[None, :])

    @staticmethod
    def vector(layout: list[Segment], scale: np.ndarray) -> np.ndarray:
        parts = [scale[first : first + width] if scaled else np.ones(width, np.float32)
                 for scaled, first, width in layout]  # fmt: skip
        return np.concatenate(parts).astype(np.float32)

    def _update(self, node, position: int, change) -> None:
        """Replace the constant input `position` of `node` by change(value), under a new name if shared."""
        from onnx import numpy_helper

        name = node.input[position]
        value = numpy_helper.to_array(self.initializers[name])
        shared = sum(name in n.input for n in self.model.graph.node) > 1
        new_name = f"{name}/smoothed/{node.name}" if shared else name
        updated = numpy_helper.from_array(np.asarray(change(value), dtype=value.dtype), new_name)
        if shared:
            self.model.graph.initializer.append(updated)
            self.initializers[new_name] = updated
            node.input[position] = new_name
        else:
            self.initializers[name].CopyFrom(updated)

    def finish(self) -> list[str]:
        """Put the inserted Muls right before the Concats they feed (the graph stays topologically sorted);
        returns their names."""
        if not self.inserted:
            return []
        nodes = []
        for node in self.model.graph.node:
            nodes.extend(self.inserted.get(node.name, []))
            nodes.append(node)
        del self.model.graph.node[:]
        self.model.graph.node.extend(nodes)
        return [mul.name for muls in self.inserted.values() for mul in muls]
