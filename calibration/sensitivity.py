"""Sensitivity analysis: which quantized nodes (or layers, or branches) cost the task metric, and the fewest to
keep in FP32 so the INT8 graph meets a target ratio of the FP32 metric.

The metric is the one the tower exists for (DESIGN decision 6), given as a function of (FP32 outputs, INT8
outputs) (toolkit.evaluate.task_metrics makes them: recall@K, agreement@K, AUC, cosine); the ratio is
metric(INT8) / metric(FP32).

Method: with all units quantized, measure the metric; then, one unit at a time, keep that unit in FP32 and
measure again (leave-one-out recovery). Units are then kept in FP32 in order of recovery, best first, until
the ratio reaches `min_metric_ratio`; each step is a point on the curve (units kept vs metric vs latency).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from calibration.qdq import quantizable_nodes, quantize_with_ranges
from calibration.ranges import RangeSet
from toolkit.core.errors import DcncError
from toolkit.core.fileio import write_json

GRANULARITIES = ("node", "layer", "branch")
METRICS = ("recall", "agreement", "auc", "cosine")
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
# Containers of the toolkit's towers whose children are the branches (interaction.cross, heads.click, ...).
CONTAINER_SCOPES = ("interaction", "sequence", "heads")

Metric = Callable[[np.ndarray, np.ndarray], float]


@dataclass
class CurvePoint:
    """The graph with `kept` units in FP32: its metric, ratio to FP32, and latency (ms per eval batch)."""

    kept: list[str]
    metric: float
    ratio: float
    latency_ms: float | None = None


@dataclass
class SensitivityReport:
    metric: str
    fp32_metric: float
    min_metric_ratio: float
    granularity: str
    units: dict[str, list[str]]  # unit -> its quantizable nodes
    recovery: dict[str, float]  # unit -> metric with only that unit kept in FP32
    curve: list[CurvePoint] = field(default_factory=list)
    fp32_latency_ms: float | None = None

    @property
    def met(self) -> bool:
        return bool(self.curve) and self.curve[-1].ratio >= self.min_metric_ratio

    @property
    def keep_fp32(self) -> list[str]:
        """Node names to keep in FP32: those of the units of the last curve point."""
        return [node for unit in (self.curve[-1].kept if self.curve else []) for node in self.units[unit]]

    def to_dict(self) -> dict:
        return asdict(self) | {"met": self.met, "keep_fp32": self.keep_fp32}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())


def unit_of(node, granularity: str) -> str:
    """The layer or branch a node belongs to. Canonical names (`cross/1/Gemm`, graphs.passes.canonicalize)
    give `cross/1` and `cross`; otherwise the exporter's module scope (`interaction.cross.layers.1.linear`)
    gives the layer (cut after the first list index) and the branch (`interaction.cross`, `head`)."""
    if granularity == "node":
        return node.name
    if "/" in node.name:
        parts = node.name.split("/")
        return "/".join(parts[:2]) if granularity == "layer" else parts[0]
    scope = _module_scope(node)
    if not scope:
        return node.name
    parts = scope.split(".")
    if granularity == "layer":
        index = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
        return ".".join(parts[: index + 1])
    return ".".join(parts[:2]) if parts[0] in CONTAINER_SCOPES and len(parts) > 1 else parts[0]


def group_units(model, nodes: list[str], granularity: str) -> dict[str, list[str]]:
    """unit -> the given node names in it, units in graph order."""
    if granularity not in GRANULARITIES:
        raise DcncError(f"--granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
    wanted = set(nodes)
    units: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.name in wanted:
            units.setdefault(unit_of(node, granularity), []).append(node.name)
    return units


def keep_in_order(units: list[str], measure: Callable[[list[str]], float], target: float,
                  say: Callable[[str], None] | None = None, keep_all: bool = True) -> tuple[list[tuple[list[str], float]], dict[str, float]]:  # fmt: skip
    """The curve of units kept FP32: measure(kept) with none kept, then (when that misses `target`) with each unit
    alone kept (its leave-one-out recovery), then units kept best recovery first until measure reaches `target`.
    Returns [(kept, value)] from none kept on, and each unit's recovery. keep_all=False stops one unit short
    of keeping every unit (that would be no INT8 at all)."""
    say = say or (lambda line: None)
    curve = [([], measure([]))]
    say(f"all {len(units)} unit(s) int8: {curve[0][1]:.4f}")
    recovery: dict[str, float] = {}
    if curve[0][1] >= target:
        return curve, recovery
    for unit in units:
        recovery[unit] = measure([unit])
        say(f"  {unit} kept fp32: {recovery[unit]:.4f}")
    order = sorted(units, key=lambda u: -recovery[u])
    for count in range(1, len(order) + (1 if keep_all else 0)):
        curve.append((order[:count], measure(order[:count])))
        say(f"keep {count} fp32: {curve[-1][1]:.4f}")
        if curve[-1][1] >= target:
            break
    return curve, recovery


def sensitivity(
    model,
    ranges: RangeSet,
    eval_feeds: dict[str, np.ndarray],
    metric: Metric,
    metric_name: str = "agreement@100",
    target: str = "cpu",
    granularity: str = "node",
    min_metric_ratio: float = 0.999,
    quantize_embeddings: bool = False,
    time_latency: bool = True,
    progress: Callable[[str], None] | None = None,
) -> SensitivityReport:
    """Measure each unit's effect on `metric` and find the fewest units to keep in FP32 for `min_metric_ratio`.

    model: the FP32 onnx.ModelProto. ranges: its calibrated ranges. eval_feeds: inputs for one evaluation
    batch (the metric is computed on the graph's first output). time_latency: time each curve point on the
    eval batch (median of interleaved runs against FP32). progress: called with a line per measurement.
    """
    if not 0.0 < min_metric_ratio <= 1.0:
        raise DcncError(f"--min-metric-ratio must be in (0, 1], got {min_metric_ratio}")
    say = progress or (lambda line: None)
    fp32_session = _session(model)
    reference = fp32_session.run(None, eval_feeds)[0]
    fp32_metric = metric(reference, reference)
    if not fp32_metric > 0:
        raise DcncError(f"sensitivity: the FP32 graph scores {metric_name} = {fp32_metric}; nothing to keep a ratio of")
    units = group_units(model, quantizable_nodes(model, target, quantize_embeddings), granularity)

    def measure(kept: list[str]) -> tuple[float, object]:
        nodes = [n for unit in kept for n in units[unit]]
        quantized, _ = quantize_with_ranges(model, ranges, target, nodes, quantize_embeddings)
        session = _session(quantized)
        return metric(reference, session.run(None, eval_feeds)[0]), session

    report = SensitivityReport(metric_name, fp32_metric, min_metric_ratio, granularity, units, {})
    sessions: dict[tuple, object] = {}

    def ratio(kept: list[str]) -> float:
        if set(kept) == set(units):  # every unit kept: the FP32 graph itself
            sessions[tuple(kept)] = fp32_session
            return 1.0
        value, sessions[tuple(kept)] = measure(kept)
        return value / fp32_metric

    curve, report.recovery = keep_in_order(list(units), ratio, min_metric_ratio, say)
    report.recovery = {unit: value * fp32_metric for unit, value in report.recovery.items()}
    points = [(kept, value * fp32_metric, sessions[tuple(kept)]) for kept, value in curve]
    latencies = _latencies(fp32_session, [p[2] for p in points], eval_feeds) if time_latency else None
    if latencies is not None:
        report.fp32_latency_ms = latencies[0]
    for i, (kept, value, _) in enumerate(points):
        latency = latencies[i + 1] if latencies is not None else None
        report.curve.append(CurvePoint(list(kept), float(value), float(value / fp32_metric), latency))
    return report


def _latencies(fp32_session, sessions: list, feeds: dict[str, np.ndarray]) -> list[float]:
    """Median ms of one run of each session (FP32 first), timed interleaved so load drift hits all alike."""
    from toolkit.backends.timing import time_interleaved

    calls = {"fp32": lambda: fp32_session.run(None, feeds)}
    calls |= {str(i): (lambda s=s: s.run(None, feeds)) for i, s in enumerate(sessions)}
    samples = time_interleaved(calls, warmup=2, iterations=7)
    return [float(np.median(samples[name])) for name in calls]


def _session(model):
    """A CPU session that does not spin: with several sessions alive and timed in turn, the idle ones' spinning
    intra-op threads would otherwise steal the cores from the one being timed (measured: 10x distortions)."""
    from toolkit.backends.ort.loader import ort_session

    return ort_session(model, spinning=False, where="sensitivity graph")


def _module_scope(node) -> str:
    """The innermost module path in the exporter's name scopes, e.g. `interaction.cross.layers.1.linear`."""
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            scopes = [s.strip(" '\"") for s in prop.value.strip("[]").split(",")]
            modules = [s for s in scopes[:-1] if s]  # the last scope is the op itself (linear_1)
            return modules[-1] if modules else ""
    return ""
