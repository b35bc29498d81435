"""The INT8 lowering `dcnc build` runs for the cpu target by default: calibration rows split into rows to
calibrate on and held-out rows, each tower judged on the held-out rows by what it exists for
(toolkit.evaluate.task_metrics.held_out_metric), and the lowering with the fewest layers FP32 that meets
--min-agreement chosen (calibration.search), its curve recorded.

The search keeps whole layers FP32, and only canonical node names (graphs.passes.canonicalize: `head/0/Concat`
beside `head/0/Gemm`) put a layer's Concat in its unit; a graph exported without that pass (`--passes none`, or
another exporter) is canonicalized first, unless --keep-fp32 names its nodes.

A bundle's embedding towers serve together (a query tower's embeddings are searched among an item tower's), so
their disagreements add up: each of n embedding towers gets 1/n of the budget, 1 - (1 - min_agreement) / n.
"""

from __future__ import annotations

from collections.abc import Callable

from calibration.int8 import Int8Lowerer
from calibration.reader import CalibrationData, hold_out
from calibration.search import HELD_OUT_FRACTION, search_precision
from graphs.passes.manager import METADATA_KEY as PASSES_KEY
from graphs.passes.manager import PassRecord, attach_records, run_passes
from toolkit.core.errors import DcncError
from toolkit.core.lowering import METADATA_KEY, Int8Lowering
from toolkit.core.onnxio import get_metadata, graph_outputs, set_metadata
from toolkit.evaluate.task_metrics import held_out_metric

DEFAULT_MIN_AGREEMENT = 0.99


def embedding_tower(model) -> bool:
    """A tower whose first output is an embedding ([B, D], D > 1), not a score."""
    shape = graph_outputs(model)[0].shape
    return len(shape) == 2 and shape[1] != 1


def canonical(model):
    """`model` with canonical node names: as it is when its export ran graphs.passes.canonicalize, else after
    that pass (its record added to the graph's dcnc.passes); as it is when the pass refuses it (the names only
    shape the search's units)."""
    records = get_metadata(model, PASSES_KEY) or []
    if any(record.get("name") == "canonicalize" for record in records):
        return model
    try:
        renamed, added = run_passes(model, ["canonicalize"])
    except DcncError:
        return model
    return attach_records(renamed, [*(PassRecord(**record) for record in records), *added])


def searched_int8(
    model,
    data: CalibrationData,
    tower: str,
    method: str = "minmax",
    isa: str | None = None,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    embedding_towers: int = 1,
    keep_fp32: list[str] = (),
    seed: int = 0,
    timing_batch: int | None = None,
    say: Callable[[str], None] | None = None,
) -> tuple[object, Int8Lowering]:
    """The searched INT8 graph of `tower` (cpu target) and its record (the search in record.search).

    embedding_towers: how many embedding towers the bundle holds (the budget split). timing_batch: rows per timed
    call when the curve is timed (the bundle's opt batch). Raises DcncError naming the tower and the best point
    when the target cannot be met."""
    fit, held_out = hold_out(data, HELD_OUT_FRACTION, seed)
    lowerer = Int8Lowerer(model, fit, "cpu", method, isa=isa)
    metric, key = held_out_metric(list(graph_outputs(model)[0].shape))
    share = embedding_towers if embedding_tower(model) else 1
    target = 1.0 - (1.0 - min_agreement) / share
    quantized, nodes, recipe, kept, bias, search = search_precision(
        lowerer, held_out, metric, key, target, list(keep_fp32), timing_batch=timing_batch, say=say
    )
    if not search.met:
        split = f" (--min-agreement {min_agreement:g} split over {share} embedding towers)" if share > 1 else ""
        raise DcncError(f"int8 tower {tower}: {search.shortfall()}{split}; lower --min-agreement (0 builds plain"
                        " INT8) or build fp16 / fp32")  # fmt: skip
    record = lowerer.record(recipe, nodes, kept, bias, search.to_dict() | {"min_agreement": min_agreement,
                                                                         "embedding_towers": share})  # fmt: skip
    set_metadata(quantized, METADATA_KEY, record.to_dict())
    return quantized, record
