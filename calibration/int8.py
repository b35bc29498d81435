"""INT8 lowering: calibrate a tower graph (through the range cache), insert the target's Q/DQ nodes, and record
what was quantized, in the graph's metadata (key dcnc.lowering) and for the bundle manifest.

The mirror image of graphs.precision's half lowering: both are a graph transform fed by calibration ranges,
composed by `dcnc build` (toolkit.commands.build)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import onnx

from calibration.cache import calibrated_ranges
from calibration.qdq import (
    TARGET_CONFIGS,
    check_target,
    quantize_with_ranges,
    unclipped_tensors,
)
from calibration.ranges import DEFAULT_PERCENTILE
from toolkit.core.lowering import METADATA_KEY, Int8Lowering
from toolkit.core.onnxio import set_metadata


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
) -> tuple[onnx.ModelProto, Int8Lowering]:
    """Calibrate `model` on `feeds` and return its INT8 Q/DQ graph for `target` with its record.

    feeds: a CalibrationData, or an iterable of feed dicts (batches; it is materialised so both calibration
    passes see the same data). method: minmax | entropy | percentile. target: cpu | tensorrt. keep_fp32: node
    names left in float. quantize_embeddings: also store embedding tables as int8. cache_dir: where
    calibration.json lives (reused when its key matches graph, data and method; rewritten otherwise); None
    disables caching.
    """
    check_target(target)
    ranges, key, cache_hit, samples = calibrated_ranges(model, feeds, method, percentile, cache_dir, progress)
    quantized, nodes = quantize_with_ranges(model, ranges, target, keep_fp32, quantize_embeddings)
    record = Int8Lowering(
        target=target,
        method=method,
        percentile=percentile if method == "percentile" else None,
        calibration_key=key,
        cache_hit=cache_hit,
        calibration_samples=samples,
        quantized_nodes=nodes,
        kept_fp32=list(keep_fp32),
        quantize_embeddings=quantize_embeddings,
        unclipped_tensors=sorted(unclipped_tensors(model)),
        config=asdict(TARGET_CONFIGS[target]),
    )
    set_metadata(quantized, METADATA_KEY, record.to_dict())
    return quantized, record
