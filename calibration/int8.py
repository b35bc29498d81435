"""INT8 lowering: calibrate a tower graph (through the range cache), apply the quality levers of a recipe, insert
the target's Q/DQ nodes, and record what was done, in the graph's metadata (key dcnc.lowering) and for the
bundle manifest.

The levers (docs/int8.md measures each on every example model):
- the ISA level (calibration.isa): 8-bit weights where u8 x s8 products accumulate in int32 (VNNI, AMX), 7-bit
  below;
- outlier smoothing (calibration.smoothing): an equivalent FP32 graph whose Gemm inputs have balanced channels;
- the cross layers' path (calibration.qdq): product and residual add on uint8 (QLinearMul / QLinearAdd, the
  fastest) or in float, each Gemm reading its own Q/DQ copy of its input (the most accurate);
- bias correction (calibration.bias): off by default, it measured no gain on the example towers.

The mirror image of graphs.precision's half lowering: both are a graph transform fed by calibration ranges,
composed by `dcnc build` (toolkit.commands.build)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from calibration.bias import correct_biases
from calibration.cache import calibrated_ranges
from calibration.isa import detect_int8_isa, saturates_here, weight_bits
from calibration.qdq import (
    CROSS_PATHS,
    TARGET_CONFIGS,
    check_target,
    quantize_with_ranges,
    unclipped_tensors,
)
from calibration.ranges import DEFAULT_PERCENTILE, RangeSet
from calibration.reader import CalibrationData
from calibration.smoothing import smooth_outliers
from toolkit.core.errors import DcncError
from toolkit.core.lowering import METADATA_KEY, Int8Lowering
from toolkit.core.onnxio import graph_inputs, set_metadata


@dataclass(frozen=True)
class Int8Recipe:
    """One combination of levers: cross_path "integer" | "float", smooth, bias_correction."""

    cross_path: str = "integer"
    smooth: bool = True
    bias_correction: bool = False

    def __post_init__(self):
        if self.cross_path not in CROSS_PATHS:
            raise DcncError(f"int8 cross path must be one of {list(CROSS_PATHS)}, got {self.cross_path!r}")

    @property
    def name(self) -> str:
        return "+".join([self.cross_path, *(["smooth"] if self.smooth else []), *(["bias"] if self.bias_correction else [])])

    def to_dict(self) -> dict:
        return asdict(self) | {"name": self.name}


# What `dcnc build` tries before keeping layers FP32, fastest first: uint8 cross layers, then float ones.
LADDER = (Int8Recipe("integer"), Int8Recipe("float"))


class Int8Lowerer:
    """The INT8 graphs of one tower from one calibration set, for any recipe and FP32 node list; smoothing and
    ranges are computed once per setting, so a search over kept layers only re-inserts Q/DQ.

    model: the FP32 onnx.ModelProto. data: CalibrationData (or feed dicts). target: cpu | tensorrt. method:
    minmax | entropy | percentile. isa: the CPU level the cpu target is built for (calibration.isa; default
    this CPU's); it decides 7- or 8-bit weights. cache_dir: where calibration.json is kept (None: no cache).
    """

    def __init__(self, model: onnx.ModelProto, data, target: str = "cpu", method: str = "minmax",
                 percentile: float = DEFAULT_PERCENTILE, isa: str | None = None, cache_dir: str | Path | None = None,
                 quantize_embeddings: bool = False, progress: bool = False):  # fmt: skip
        check_target(target)
        self.model, self.target, self.method, self.percentile = model, target, method, percentile
        self.data = data if isinstance(data, CalibrationData) else CalibrationData.from_feeds(data, graph_inputs(model))
        self.isa = (isa or detect_int8_isa()) if target == "cpu" else None
        self.cache_dir, self.quantize_embeddings, self.progress = cache_dir, quantize_embeddings, progress
        self._prepared: dict[bool, tuple] = {}

    @property
    def reduce_range(self) -> bool | None:
        return weight_bits(self.isa) == 7 if self.isa else None

    @property
    def foreign_kernel(self) -> bool:
        """The graphs keep more weight bits than this CPU's integer kernel takes without saturating (built with
        --int8-isa for a VNNI / AMX machine on an AVX2 one): run here they would not compute what they compute
        there, so their quality is judged on onnxruntime's unfused Q/DQ graph and their speed is not measured."""
        return self.target == "cpu" and saturates_here(self.isa)

    def prepared(self, smooth: bool) -> tuple[onnx.ModelProto, RangeSet, dict, list[str]]:
        """(graph to quantize, its ranges, how they were calibrated, Muls smoothing put on graph inputs)."""
        if smooth not in self._prepared:
            graph, smoothing, inserted = self.model, None, []
            if smooth:
                levels = 63 if self.reduce_range else 127
                graph, record = smooth_outliers(self.model, self.data.batches, levels)
                smoothing, inserted = record.to_dict(), record.inserted
            ranges, key, hit, samples = calibrated_ranges(graph, self.data, self.method, self.percentile,
                                                          self.cache_dir, self.progress)  # fmt: skip
            calibration = {"key": key, "cache_hit": hit, "samples": samples, "smoothing": smoothing}
            self._prepared[smooth] = (graph, ranges, calibration, inserted)
        return self._prepared[smooth]

    def lower(self, recipe: Int8Recipe, keep_fp32: Iterable[str] = ()) -> tuple[onnx.ModelProto, list[str], dict]:
        """(Q/DQ graph, quantized node names, bias correction record or None) for `recipe` with `keep_fp32` float."""
        graph, ranges, _, inserted = self.prepared(recipe.smooth)
        keep = [*inserted, *keep_fp32]

        def quantize(model):
            return quantize_with_ranges(model, ranges, self.target, keep, self.quantize_embeddings,
                                        self.reduce_range, recipe.cross_path)  # fmt: skip

        bias = None
        if recipe.bias_correction:
            graph, record = correct_biases(graph, lambda model: quantize(model)[0], self.data.batches)
            bias = record.to_dict()
        quantized, nodes = quantize(graph)
        return quantized, nodes, bias

    def _uint8_cross(self, recipe: Int8Recipe) -> bool:
        """The cross layers' product and residual run on uint8 (their skip path then keeps its minmax range)."""
        return recipe.cross_path == "integer" and "Add" in TARGET_CONFIGS[self.target].op_types

    def record(self, recipe: Int8Recipe, nodes: list[str], keep_fp32: Iterable[str], bias: dict | None,
               search: dict | None = None) -> Int8Lowering:  # fmt: skip
        graph, ranges, calibration, _ = self.prepared(recipe.smooth)
        return Int8Lowering(
            target=self.target,
            method=self.method,
            percentile=self.percentile if self.method == "percentile" else None,
            calibration_key=calibration["key"],
            cache_hit=calibration["cache_hit"],
            calibration_samples=calibration["samples"],
            quantized_nodes=nodes,
            kept_fp32=list(keep_fp32),
            quantize_embeddings=self.quantize_embeddings,
            unclipped_tensors=sorted(unclipped_tensors(graph)) if self._uint8_cross(recipe) else [],
            config=asdict(TARGET_CONFIGS[self.target]) | {"reduce_range": self.reduce_range},
            isa=self.isa,
            recipe=recipe.to_dict(),
            smoothing=calibration["smoothing"],
            bias_correction=bias,
            gemm_inputs=gemm_input_ranges(graph, ranges),
            search=search,
        )


def gemm_input_ranges(model: onnx.ModelProto, ranges: RangeSet) -> list[dict]:
    """Per Gemm / MatMul input: the range calibration chose, the observed min/max, and the share of calibration
    values clipped (what entropy or percentile cost that input)."""
    rows = []
    for node in model.graph.node:
        tensor = node.input[0] if node.op_type in ("Gemm", "MatMul") and node.input else None
        if tensor in ranges.calibrated:
            rows.append({"node": node.name, "tensor": tensor, "range": list(ranges.calibrated[tensor]),
                         "minmax": list(ranges.minmax[tensor]), "clipped": ranges.clipped.get(tensor, 0.0)})  # fmt: skip
    return rows


def quantize_int8(
    model: onnx.ModelProto,
    feeds,
    method: str = "minmax",
    target: str = "cpu",
    keep_fp32: Iterable[str] = (),
    quantize_embeddings: bool = False,
    cache_dir: str | Path | None = None,
    percentile: float = DEFAULT_PERCENTILE,
    progress: bool = False,
    isa: str | None = None,
    recipe: Int8Recipe = Int8Recipe(),
) -> tuple[onnx.ModelProto, Int8Lowering]:
    """Calibrate `model` on `feeds` and return its INT8 Q/DQ graph for `target` with its record: one recipe, the
    given nodes in FP32, no search (`dcnc build` searches: calibration.search).

    feeds: a CalibrationData, or an iterable of feed dicts (batches; it is materialised so both calibration
    passes see the same data). method: minmax | entropy | percentile. target: cpu | tensorrt. keep_fp32: node
    names left in float. quantize_embeddings: also store embedding tables as int8. cache_dir: where
    calibration.json lives (reused when its key matches graph, data and method; rewritten otherwise); None
    disables caching. isa: the CPU level (calibration.isa, default this CPU's). recipe: the levers.
    """
    lowerer = Int8Lowerer(model, feeds, target, method, percentile, isa, cache_dir, quantize_embeddings, progress)
    keep_fp32 = list(keep_fp32)
    quantized, nodes, bias = lowerer.lower(recipe, keep_fp32)
    record = lowerer.record(recipe, nodes, keep_fp32, bias)
    set_metadata(quantized, METADATA_KEY, record.to_dict())
    return quantized, record
