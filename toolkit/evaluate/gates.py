"""Pass/fail gates of `dcnc verify`: default thresholds per precision, a TOML gates file, flag overrides,
and the latency comparison against a baseline report.

Gates file (every key optional; flags override it, it overrides the precision's defaults):

    precision = "fp16"          # which defaults to start from (else the bundle's precision)
    [gates]
    cosine_min = 0.9995         # per output with vectors per row: lowest per-row cosine similarity, at least
    rel_l2 = 1e-3               # per output: ||c - r|| / ||r||, at most
    max_abs = 1e-2              # per output: largest |c - r|, at most
    recall_ratio = 0.999        # per K: candidate recall@K / reference recall@K, at least
    recall_ratio_floor = 0.995  # the lowest the recall gate may be relaxed to where the data cannot resolve finer
                                # (two standard errors of the per-query difference); unset: never relaxed (FP32)
    agreement = 0.99            # per K: shared share of the two top-K lists, at least
    auc_diff = 1e-3             # per labelled output: |candidate AUC - reference AUC|, at most
    logloss_diff = 1e-3         # per labelled output: |candidate - reference log loss|, at most
    min_speedup = 1.0           # per tower and batch: the paired speedup, at least (off by default)
    latency_tolerance = 0.02    # with --baseline: smallest regression ever flagged (the runs' noise may be larger)

Beside these, every bundle built by this dcnc carries the sha256 of each weight it was built from (manifest
towers.*.source_weights); verify matches them by name to the reference's parameters, and one differing tensor
fails `weights.<tower>.mismatched` (weight_gates), whatever the precision.

Latency gates judge only conclusive figures (toolkit.evaluate.latency): a speedup whose 95% interval is wider
than the run could narrow fails its gate with the reason, and a baseline comparison never tolerates more than
MAX_LATENCY_TOLERANCE of regression, however noisy the run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.core.errors import DcncError
from toolkit.core.fileio import read_json, read_toml
from toolkit.evaluate.latency import INCONCLUSIVE
from toolkit.evaluate.result import SCHEMA, Gate

MAX_LATENCY_TOLERANCE = 0.25  # a baseline comparison noisier than this cannot tell a regression from the load


@dataclass
class Thresholds:
    """Gate thresholds; None switches a gate off (recall_ratio_floor None: the recall gate is never relaxed)."""

    cosine_min: float | None = 0.999999
    rel_l2: float | None = 1e-4
    max_abs: float | None = 1e-3
    recall_ratio: float | None = 0.999
    recall_ratio_floor: float | None = None
    agreement: float | None = 0.999
    auc_diff: float | None = 1e-4
    logloss_diff: float | None = 1e-4
    min_speedup: float | None = None
    latency_tolerance: float = 0.02


# Each default sits between what a faithful lowering reaches and what a broken model looks like, both measured on
# the example two-tower and ranker (tests/commands/test_gates_catch_a_scaled_layer.py keeps them honest: a bundle
# whose export had one layer's weights scaled by 1.05 fails at every precision).
DEFAULTS: dict[str, Thresholds] = {
    # FP32 graphs differ from torch only by summation order (rel L2 ~1e-7); one layer x1.05 gives rel L2 >= 7e-3.
    "fp32": Thresholds(),
    # FP16 rounds each activation to 2^-11 = 4.9e-4 relative: faithful lowerings measured rel L2 3.6e-4 (two-tower)
    # and 4.3e-4 (ranker), row cosine >= 1 - 2e-7; one layer x1.05 measured rel L2 7.1e-3..5e-2 and row cosine
    # <= 1 - 1.6e-4. The gates sit 4-5x above the first and below the second.
    "fp16": Thresholds(cosine_min=0.99998, rel_l2=2e-3, max_abs=5e-2, recall_ratio=0.999, recall_ratio_floor=0.995,
                       agreement=0.99, auc_diff=1e-3, logloss_diff=1e-3),
    # BF16 keeps 8 significand bits (2^-8 = 3.9e-3 relative): the FP16 reasoning at 8x the rounding. It cannot
    # tell a 5% drift in one layer from its own rounding everywhere; its task metrics still must hold.
    "bf16": Thresholds(cosine_min=0.9995, rel_l2=1.6e-2, max_abs=0.25, recall_ratio=0.995, recall_ratio_floor=0.99,
                       agreement=0.98, auc_diff=2e-3, logloss_diff=4e-3),
    # INT8 rounds each activation to 1/255 of its range: its own error (example two-tower rel L2 4.7e-3, ranker
    # 2.8e-2, row cosine >= 0.9987) is the size of one layer x1.05 (7e-3..5e-2), so no output gate can tell them
    # apart; the weights gate (weight_gates) does. Its task gates hold it to 99% of the FP32 recall (MLPerf
    # DLRMv2's bar), BF16's AUC and log-loss bounds (measured 1.2e-4 and 7.5e-5 on the ranker) and agreement@K
    # >= 0.98 at every K, K = 1 included (measured 0.986, 0.992, 0.996 at K = 1, 10, 100; dcnc build holds the
    # held-out agreement@100 of the two towers together at --min-agreement 0.99).
    "int8": Thresholds(cosine_min=0.995, rel_l2=0.1, max_abs=None, recall_ratio=0.99, recall_ratio_floor=0.95,
                       agreement=0.98, auc_diff=2e-3, logloss_diff=4e-3),
}
GATE_KEYS = tuple(f.name for f in dataclasses.fields(Thresholds))


def load_gates_file(path: str | Path) -> tuple[str | None, dict[str, float]]:
    """The precision named in a gates file (or None) and its [gates] table, checked for known keys and numbers."""
    data = read_toml(path, "gates file")
    unknown = sorted(set(data) - {"precision", "gates"})
    if unknown:
        raise DcncError(f"{path}: unknown key {unknown[0]!r} (expected 'precision' and a [gates] table)")
    precision = data.get("precision")
    if precision is not None and precision not in DEFAULTS:
        raise DcncError(f"{path}: precision {precision!r} is not one of {list(DEFAULTS)}")
    gates = data.get("gates", {})
    if not isinstance(gates, dict):
        raise DcncError(f"{path}: 'gates' must be a table")
    for key, value in gates.items():
        if key not in GATE_KEYS:
            raise DcncError(f"{path}: unknown gate {key!r} (known: {list(GATE_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise DcncError(f"{path}: gate {key!r} must be a number, got {value!r}")
    return precision, {k: float(v) for k, v in gates.items()}


def resolve_thresholds(
    precision: str, gates_file: str | Path | None = None, overrides: dict[str, float | None] | None = None
) -> Thresholds:
    """Defaults for `precision` (or the file's), then the file's [gates], then `overrides` (None entries ignored)."""
    table: dict[str, float] = {}
    if gates_file is not None:
        file_precision, table = load_gates_file(gates_file)
        precision = file_precision or precision
    if precision not in DEFAULTS:
        raise DcncError(f"precision {precision!r} has no default gates (known: {list(DEFAULTS)})")
    settings = {**dataclasses.asdict(DEFAULTS[precision]), **table}
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return Thresholds(**settings)


def evaluate_gates(
    thresholds: Thresholds,
    parity: dict[str, dict[str, Any]],
    retrieval: dict[str, Any] | None = None,
    ranking: dict[str, Any] | None = None,
    latency: dict[str, Any] | None = None,
) -> list[Gate]:
    """Every gate the report's sections call for, in report order."""
    t = thresholds
    gates = []
    for output, stats in parity.items():
        nonfinite = stats["candidate_nan"] + stats["candidate_inf"]
        gates.append(Gate(f"parity.{output}.nonfinite", float(nonfinite), 0.0, "<="))
        for key, op in (("cosine_min", ">="), ("rel_l2", "<="), ("max_abs", "<=")):
            if getattr(t, key) is not None and stats[key] is not None:  # no cosine for one value per row
                gates.append(Gate(f"parity.{output}.{key}", stats[key], getattr(t, key), op))
    if retrieval is not None:
        resolution = retrieval.get("recall_ratio_resolution", {})
        for k, ratio in retrieval["recall_ratio"].items():
            if t.recall_ratio is not None:
                # Where the precision rounds (never FP32), never finer than the evaluation set resolves (two
                # standard errors of the paired per-query difference: a few near-ties swapped at K = 1 are
                # chance); never below the floor either. Agreement@K still checks the lists item by item.
                threshold = t.recall_ratio
                if t.recall_ratio_floor is not None:
                    threshold = max(t.recall_ratio_floor, min(threshold, 1.0 - resolution.get(k, 0.0)))
                gates.append(Gate(f"retrieval.recall@{k}.ratio", ratio, threshold, ">="))
        for k, agreement in retrieval["agreement"].items():
            if t.agreement is not None:
                gates.append(Gate(f"retrieval.agreement@{k}", agreement, t.agreement, ">="))
    if ranking is not None:
        for output, metrics in ranking["outputs"].items():
            for metric, key in (("auc", "auc_diff"), ("logloss", "logloss_diff")):
                if getattr(t, key) is not None:
                    gates.append(Gate(f"ranking.{output}.{key}", abs(metrics[metric]["diff"]), getattr(t, key), "<="))
    if latency is not None and t.min_speedup is not None:
        for tower, batches in latency["towers"].items():
            for batch, entry in batches.items():
                reason = _inconclusive(entry, latency.get("load"))
                gates.append(Gate(f"latency.{tower}.b{batch}.speedup", entry["speedup"], t.min_speedup, ">=", reason))
    return gates


def match_weights(built: dict[str, str], reference: dict[str, str]) -> dict[str, Any]:
    """The bundle's source weights (digests by name) against the reference's parameters of the same names."""
    shared = sorted(set(built) & set(reference))
    return {"checked": len(shared), "mismatched": [name for name in shared if built[name] != reference[name]]}


def weight_gates(weights: dict[str, dict[str, Any]]) -> list[Gate]:
    """One gate per tower whose source weights could be matched by name: none may differ from the reference's.
    Output gates cannot see a small drift under a lowering's larger error (INT8); the weights themselves can."""
    gates = []
    for tower, match in weights.items():
        if match["checked"]:
            wrong = match["mismatched"]
            reason = f"built from other weights: {', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}" if wrong else None
            gates.append(Gate(f"weights.{tower}.mismatched", float(len(wrong)), 0.0, "<=", reason))
    return gates


def load_baseline(path: str | Path) -> dict[str, Any]:
    """An earlier verify report (schema dcnc.verify/1) with a latency section."""
    report = read_json(path, "baseline report")
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise DcncError(f"{path}: not a verify report (expected \"schema\": \"{SCHEMA}\")")
    if not isinstance(report.get("latency"), dict) or not report["latency"].get("towers"):
        raise DcncError(f"{path}: the baseline report has no latency section")
    return report


def _inconclusive(entry: dict[str, Any], load: dict[str, Any] | None) -> str | None:
    """Why a latency entry cannot be judged (its interval too wide, with the machine's load), or None."""
    if entry.get("verdict") != INCONCLUSIVE:
        return None
    busy = (load or {}).get("busy")
    at = f" with {busy:.1f} of {load['cores']} cores busy" if busy is not None else ""
    return f"inconclusive: the speedup's 95% interval is ±{100 * entry['noise']:.0f}%{at}"


def baseline_gates(latency: dict[str, Any], baseline: dict[str, Any], floor: float, where: str = "baseline") -> list[Gate]:
    """One gate per tower and batch size measured in both runs: the speedup's drop since the baseline (old /
    new - 1, so machine-wide slowdowns cancel) must stay within the two runs' noise together (each run's
    interval half-width, toolkit.evaluate.latency, added in quadrature: both are estimates), at least `floor`
    and at most MAX_LATENCY_TOLERANCE; an inconclusive entry fails with its reason."""
    gates = []
    old_towers = baseline["latency"]["towers"]
    for tower, batches in latency["towers"].items():
        for batch, entry in batches.items():
            old = old_towers.get(tower, {}).get(batch)
            if old is None:
                continue
            try:
                regression = float(old["speedup"]) / float(entry["speedup"]) - 1.0
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                raise DcncError(f"{where}: latency of {tower} batch {batch} has no speedup to compare") from None
            noise = math.hypot(entry["noise"], float(old.get("noise") or 0.0))
            tolerance = min(max(noise, floor), MAX_LATENCY_TOLERANCE)
            reason = _inconclusive(entry, latency.get("load"))
            if reason is None and noise > MAX_LATENCY_TOLERANCE:
                reason = f"inconclusive: ±{100 * noise:.0f}% noise is wider than the {MAX_LATENCY_TOLERANCE:.0%} a baseline can judge"
            gates.append(Gate(f"latency.{tower}.b{batch}.regression", regression, tolerance, "<=", reason))
    if not gates:
        raise DcncError(f"{where}: no tower and batch size in common with this run (compare like with like)")
    return gates
