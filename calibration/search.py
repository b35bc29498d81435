"""Metric-targeted mixed precision: the INT8 lowering of one tower that keeps the fewest layers FP32 for a
held-out agreement target, judged without labels by what the tower exists for.

Calibration rows are split (calibration.reader.hold_out): the lowering is calibrated on one part and judged on
the other, FP32 outputs against INT8 outputs of the same rows, by a metric of (reference, candidate) -> {name:
value} that toolkit.evaluate.task_metrics makes (an embedding tower: agreement@K of each row's nearest
neighbours among the others; a scoring tower: the share of score pairs in the same order).

Search: the recipes of the ladder (calibration.int8.LADDER: uint8 cross layers, then float ones) are tried with
nothing kept FP32, fastest first; if none meets the target, layers of the last (most accurate) recipe are kept
FP32 in order of leave-one-out recovery (calibration.sensitivity.keep_in_order) until it is met, at most all
layers (units holding a Gemm / MatMul) but one. The first point that meets the target is chosen; every point is timed against FP32 (interleaved)
so the record shows the trade-off; when no point meets the target the best one is returned, unmet (`dcnc
build` refuses it, naming it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from calibration.int8 import LADDER, Int8Lowerer, Int8Recipe
from calibration.qdq import WEIGHT_OPS, quantizable_nodes
from calibration.ranges import largest_input
from calibration.sensitivity import group_units, keep_in_order
from toolkit.core.errors import DcncError

HELD_OUT_FRACTION = 0.5  # agreement@100 needs many more than 100 held-out rows: half of 2048 calibration rows
TIMING_ITERATIONS = 20

AgreementMetric = Callable[[np.ndarray, np.ndarray], dict[str, float]]


@dataclass
class PrecisionPoint:
    """One lowering tried: its recipe, the layers kept FP32, its held-out agreement, its speed over FP32."""

    recipe: str
    kept: list[str]
    agreement: dict[str, float]
    speedup: float | None = None


@dataclass
class PrecisionSearch:
    """The curve of a search (points in the order tried), the target on `metric`, and which point was chosen
    (None: none met it). recovery: per unit, `metric` with only that unit kept FP32 (why layers were kept)."""

    metric: str
    target: float
    held_out_rows: int
    timing_batch: int | None
    points: list[PrecisionPoint] = field(default_factory=list)
    chosen: int | None = None
    recovery: dict[str, float] = field(default_factory=dict)
    emulated: bool = False  # judged on the unfused graph: built for another CPU's kernel (Int8Lowerer.foreign_kernel)

    @property
    def met(self) -> bool:
        return self.chosen is not None

    def best(self) -> PrecisionPoint:
        return max(self.points, key=lambda p: p.agreement[self.metric])

    def shortfall(self) -> str:
        """Why the search found no point: the best one, for a refusal."""
        best = self.best()
        kept = ", ".join(best.kept) or "none"
        speed = f", {best.speedup:.2f}x FP32" if best.speedup else ""
        return (f"held-out {self.metric} reaches at best {best.agreement[self.metric]:.4f} ({best.recipe}, layers kept"
                f" FP32: {kept}{speed}; {len(self.points)} points tried), short of the target {self.target:g}")  # fmt: skip

    def to_dict(self) -> dict:
        chosen = asdict(self.points[self.chosen]) if self.chosen is not None else None
        return asdict(self) | {"chosen": chosen, "chosen_index": self.chosen}


def search_precision(
    lowerer: Int8Lowerer,
    held_out: dict[str, np.ndarray],
    metric: AgreementMetric,
    key: str,
    target: float,
    keep_fp32: list[str] = (),
    ladder: tuple[Int8Recipe, ...] = LADDER,
    granularity: str = "layer",
    timing_batch: int | None = None,
    say: Callable[[str], None] | None = None,
):
    """Search the lowering of `lowerer`'s tower for held-out `metric`[`key`] >= `target` (see the module).

    held_out: feeds of the held-out rows. keep_fp32: nodes kept FP32 whatever the search finds. timing_batch:
    rows per timed call (held-out rows repeated), None to skip timing. Returns (INT8 graph, quantized nodes,
    recipe, nodes kept FP32, bias record, PrecisionSearch) of the chosen point, or of the best one when no
    point meets the target (search.met False: `dcnc build` refuses it, with search.shortfall()).
    """
    from toolkit.backends.ort.loader import OrtOptions, ort_session

    say = say or (lambda line: None)
    # unfused, each Q/DQ pair runs as float rounding: the integer result a VNNI / AMX kernel gives exactly (to
    # float32 accumulation), where this CPU's own kernel would saturate 8-bit weights
    emulated = lowerer.foreign_kernel
    judged = OrtOptions(opt_level="disable") if emulated else None
    if emulated:
        say(f"built for {lowerer.isa}, this CPU's int8 kernel differs: agreement judged on the unfused Q/DQ graph,"
            " speed not measured")
        timing_batch = None
    reference = ort_session(lowerer.model, where="FP32 tower").run(None, held_out)[0]
    if not np.isfinite(reference).all():  # agreement would rank NaNs: say what calibration would have said
        raise DcncError(f"calibration: the FP32 tower's output is inf or NaN on this data (float32 overflows in the"
                        f" graph, largest |input| {largest_input(held_out, lowerer.model):.3g}); check the data's scale")
    rows = len(next(iter(held_out.values())))
    search = PrecisionSearch(key, target, rows, timing_batch, emulated=emulated)
    forced = set(keep_fp32)
    candidates = [n for n in quantizable_nodes(lowerer.model, lowerer.target, lowerer.quantize_embeddings) if n not in forced]
    weighted = {node.name for node in lowerer.model.graph.node if node.op_type in WEIGHT_OPS}
    # a unit is a layer with a Gemm / MatMul: keeping a lone Concat or shape op FP32 buys nothing
    units = {u: nodes for u, nodes in group_units(lowerer.model, candidates, granularity).items() if weighted & set(nodes)}
    tried: dict[tuple, tuple] = {}  # (recipe, kept units) -> (point, recipe, nodes, lowered)

    def measure(recipe: Int8Recipe, kept: list[str]) -> float:
        if (recipe.name, tuple(kept)) not in tried:
            nodes = [*keep_fp32, *(n for unit in kept for n in units[unit])]
            lowered = lowerer.lower(recipe, nodes)
            output = ort_session(lowered[0], options=judged, where="INT8 tower").run(None, held_out)[0]
            point = PrecisionPoint(recipe.name, list(kept), metric(reference, output))
            tried[(recipe.name, tuple(kept))] = (point, recipe, nodes, lowered)
        return tried[(recipe.name, tuple(kept))][0].agreement[key]

    curve = []
    for recipe in ladder[:-1]:
        say(f"{recipe.name}: {key} {measure(recipe, []):.4f}")
        curve.append((recipe.name, ()))
        if tried[curve[-1]][0].agreement[key] >= target:
            break
    else:
        recipe = ladder[-1]
        kept_curve, search.recovery = keep_in_order(list(units), lambda kept: measure(recipe, kept), target,
                                                    lambda line: say(f"{recipe.name}: {line}"), keep_all=False)  # fmt: skip
        curve += [(recipe.name, tuple(kept)) for kept, _ in kept_curve]
    search.points = [tried[step][0] for step in curve]
    graphs = [tried[step][1:] for step in curve]
    met = [i for i, p in enumerate(search.points) if p.agreement[key] >= target]
    search.chosen = met[0] if met else None
    if timing_batch:
        for point, speedup in zip(search.points, _speedups(lowerer.model, [g[2][0] for g in graphs], held_out, timing_batch)):
            point.speedup = speedup
    best = search.chosen if search.met else search.points.index(search.best())
    recipe, nodes, (quantized, quantized_nodes, bias) = graphs[best]
    return quantized, quantized_nodes, recipe, nodes, bias, search


def _speedups(model, lowered: list, held_out: dict[str, np.ndarray], batch: int) -> list[float]:
    """FP32 ms / INT8 ms of each graph on `batch` rows (held-out rows repeated), each side's fastest of
    TIMING_ITERATIONS calls (the least disturbed on a shared machine), all timed in one interleaved run with
    intra-op spinning off (so the idle sessions leave the cores to the timed one)."""
    from toolkit.backends.ort.loader import ort_session
    from toolkit.backends.timing import time_interleaved

    rows = len(next(iter(held_out.values())))
    take = np.arange(batch) % rows
    feeds = {name: np.ascontiguousarray(array[take]) for name, array in held_out.items()}
    sessions = [ort_session(g, spinning=False, where="timed tower") for g in [model, *lowered]]
    calls = {str(i): (lambda s=s: s.run(None, feeds)) for i, s in enumerate(sessions)}
    samples = time_interleaved(calls, warmup=2, iterations=TIMING_ITERATIONS)
    fastest = [float(np.min(samples[str(i)])) for i in range(len(sessions))]
    return [round(fastest[0] / ms, 3) for ms in fastest[1:]]
