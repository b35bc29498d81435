"""The one comparator of a candidate's outputs with a reference's: streamed error statistics (ParityAccumulator,
what verify reports and gates) and the per-element tolerance check of an exported graph (compare_outputs, which
takes its cosine from the same accumulator)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.core.errors import DcncError

QUANTILES = (0.5, 0.9, 0.99, 0.999)
# Error quantiles come from a log-spaced histogram: BINS_PER_DECADE bins per factor of 10 between
# 10**LOG_LOW and 10**LOG_HIGH. A reported quantile is the upper edge of its bin: never below the exact
# value, at most 10**(1/64) - 1 = 3.7 % above it.
BINS_PER_DECADE = 64
LOG_LOW, LOG_HIGH = -12, 6


DEFAULT_RTOL = 1e-5
DEFAULT_ATOL_SCALE = 1e-5  # the default atol is this fraction of the output's scale (max |reference|)
DEFAULT_MIN_COSINE = 0.99999


@dataclass(frozen=True)
class Tolerance:
    """Pass when |candidate - reference| <= atol + rtol * |reference| everywhere and each row's cosine >= min_cosine
    (outputs with one value per row have no cosine: the elementwise check alone judges them).

    atol None: DEFAULT_ATOL_SCALE x the output's scale, so an error of 1e-5 of the scale passes whatever the
    output's magnitude (a logit of 30 and a unit-norm embedding are judged alike).
    """

    atol: float | None = None
    rtol: float = DEFAULT_RTOL
    min_cosine: float = DEFAULT_MIN_COSINE

    def __post_init__(self) -> None:
        if (self.atol is not None and not self.atol >= 0) or not self.rtol >= 0:
            raise DcncError(f"tolerances must be >= 0 (atol {self.atol}, rtol {self.rtol})")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise DcncError(f"the cosine threshold must lie in [-1, 1], got {self.min_cosine}")


@dataclass
class OutputParity:
    """How one output of the candidate compares with the reference on one set of inputs (`case`)."""

    output: str
    case: str
    passed: bool
    max_abs: float = float("nan")
    where: tuple[int, ...] = ()  # index of the largest absolute error
    rel_err: float = float("nan")  # max_abs / |reference| at `where`
    scale: float = float("nan")  # max |reference|
    cosine: float = float("nan")
    atol: float = float("nan")
    mismatched: int = 0  # elements outside atol + rtol |reference|
    size: int = 0
    reason: str = ""  # why no number could be computed (a missing output, a shape mismatch, a runtime error)

    @property
    def error_to_scale(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else self.max_abs


def compare_outputs(
    reference: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    tolerance: Tolerance = Tolerance(),
    case: str = "",
) -> list[OutputParity]:
    """One OutputParity per reference output, in the reference's order."""
    return [_compare_one(name, ref, candidate.get(name), tolerance, case) for name, ref in reference.items()]


def _compare_one(name: str, ref: np.ndarray, cand: np.ndarray | None, tol: Tolerance, case: str) -> OutputParity:
    if cand is None:
        return OutputParity(name, case, False, reason="missing from the candidate's outputs")
    ref, cand = np.asarray(ref), np.asarray(cand)
    if ref.shape != cand.shape:
        return OutputParity(name, case, False, reason=f"shape {list(cand.shape)}, expected {list(ref.shape)}")
    r, c = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
    finite = np.isfinite(r)
    scale = float(np.abs(r[finite]).max()) if finite.any() else 0.0
    scale = scale if scale > 0 else 1.0
    atol = tol.atol if tol.atol is not None else DEFAULT_ATOL_SCALE * scale
    # NaN/Inf in the same place on both sides count as equal; anywhere else as an infinite error
    same_nonfinite = (r == c) | (np.isnan(r) & np.isnan(c))
    err = np.where(same_nonfinite, 0.0, np.abs(c - r))
    err = np.where(np.isnan(err), np.inf, err)
    mismatched = int(np.count_nonzero(err > atol + tol.rtol * np.abs(np.where(finite, r, 0.0))))
    at = int(np.argmax(err)) if err.size else 0
    max_abs = float(err[at]) if err.size else 0.0
    rel = max_abs / abs(r[at]) if err.size and r[at] != 0 else (0.0 if max_abs == 0 else float("inf"))
    cos = ParityAccumulator.of(ref, cand)["cosine_min"]
    cos = float("nan") if cos is None else cos
    return OutputParity(
        output=name,
        case=case,
        passed=mismatched == 0 and not cos < tol.min_cosine,  # NaN: no cosine to judge
        max_abs=max_abs,
        where=tuple(int(i) for i in np.unravel_index(at, ref.shape)) if ref.ndim and err.size else (),
        rel_err=float(rel),
        scale=scale,
        cosine=cos,
        atol=float(atol),
        mismatched=mismatched,
        size=int(r.size),
    )


class ParityAccumulator:
    """Elementwise agreement of a candidate output with the reference, accumulated over batches.

    Reported: max_abs and quantiles of |candidate - reference|, rel_l2 = ||c - r|| / ||r||, cosine mean and min
    per row (a sample's output flattened), counts of NaN / Inf on each side, and the histogram of |c - r| (see
    `histogram`). An output with one value per row ([B] or [B, 1]: a logit) has no cosine (None: a cosine of
    two scalars is only their signs' agreement, and one over the whole batch hides any single row); its
    rel_l2 and max_abs judge it. Error statistics use positions where both sides are finite; the counts say
    how many were not.
    """

    def __init__(self) -> None:
        self.edges = 10.0 ** (np.arange(LOG_LOW * BINS_PER_DECADE, LOG_HIGH * BINS_PER_DECADE + 1) / BINS_PER_DECADE)
        # bins[0] holds errors <= edges[0] (reported as 0 when it is the quantile), bins[-1] those above edges[-1]
        self.bins = np.zeros(len(self.edges) + 1, dtype=np.int64)
        self.count = 0
        self.max_abs = 0.0
        self.sq_diff = 0.0
        self.sq_ref = 0.0
        self.cos_sum = 0.0
        self.cos_min = np.inf
        self.rows = 0
        self.scalar_rows = False  # one value per row: no cosine
        self.nonfinite = {"reference_nan": 0, "reference_inf": 0, "candidate_nan": 0, "candidate_inf": 0}

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        if reference.shape != candidate.shape:
            raise DcncError(f"parity: output shapes differ, reference {list(reference.shape)} vs candidate {list(candidate.shape)}")
        ref = reference.astype(np.float64)
        cand = candidate.astype(np.float64)
        for side, array in (("reference", ref), ("candidate", cand)):
            self.nonfinite[f"{side}_nan"] += int(np.isnan(array).sum())
            self.nonfinite[f"{side}_inf"] += int(np.isinf(array).sum())
        finite = np.isfinite(ref) & np.isfinite(cand)
        ref, cand = np.where(finite, ref, 0.0), np.where(finite, cand, 0.0)
        error = np.abs(cand - ref)[finite]
        if error.size:
            self.count += error.size
            self.max_abs = max(self.max_abs, float(error.max()))
            self.bins += np.bincount(np.searchsorted(self.edges, error), minlength=len(self.bins))
        self.sq_diff += float(np.sum((cand - ref) ** 2))
        self.sq_ref += float(np.sum(ref**2))
        if ref.ndim <= 1 or ref[0].size == 1:
            self.scalar_rows = True
            return
        rows_ref, rows_cand = ref.reshape(len(ref), -1), cand.reshape(len(cand), -1)
        cosine = _cosine_rows(rows_ref, rows_cand)
        self.cos_sum += float(cosine.sum())
        self.cos_min = min(self.cos_min, float(cosine.min(initial=np.inf)))
        self.rows += len(cosine)

    def merge(self, other: ParityAccumulator) -> None:
        """Add what `other` accumulated over other rows (a worker's share of a corpus), as if updated here."""
        self.bins += other.bins
        self.count += other.count
        self.max_abs = max(self.max_abs, other.max_abs)
        self.sq_diff += other.sq_diff
        self.sq_ref += other.sq_ref
        self.cos_sum += other.cos_sum
        self.cos_min = min(self.cos_min, other.cos_min)
        self.rows += other.rows
        self.scalar_rows = self.scalar_rows or other.scalar_rows
        for key, count in other.nonfinite.items():
            self.nonfinite[key] += count

    def quantile(self, q: float) -> float:
        """Upper bound of the q-quantile of |c - r|, the smallest error with a share q of all errors at or below it
        (within 3.7 %; 0 when at or below 1e-12)."""
        if self.count == 0:
            return float("nan")
        bin_index = int(np.searchsorted(np.cumsum(self.bins), q * self.count))
        if bin_index == 0:
            return 0.0
        return float(self.edges[bin_index]) if bin_index < len(self.edges) else self.max_abs

    def histogram(self) -> dict[str, Any]:
        """The log-spaced counts of |c - r| behind the quantiles, for plotting: `counts[i]` errors lie in
        (`edges[i]`, `edges[i + 1]`] (edges to 6 significant digits, the last one max_abs when errors exceed
        10**LOG_HIGH); empty bins before the first and after the last non-empty one are left out. Errors at or
        below 10**LOG_LOW (exact matches included), which a log axis cannot show, are counted in `at_or_below`."""
        log_bins = np.flatnonzero(self.bins[1:]) + 1  # bins[j] holds (edges[j-1], edges[j]]; bins[-1] everything above
        histogram: dict[str, Any] = {"edges": [], "counts": [],
                                     "at_or_below": {"value": float(self.edges[0]), "count": int(self.bins[0])}}
        if log_bins.size:
            first, last = int(log_bins[0]), int(log_bins[-1])
            top = float(self.edges[last]) if last < len(self.edges) else self.max_abs
            edges = [*self.edges[first - 1 : last], top]
            histogram["edges"] = [float(f"{e:.6g}") for e in edges]
            histogram["counts"] = self.bins[first : last + 1].tolist()
        return histogram

    @classmethod
    def of(cls, reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
        """The statistics of one output in one call."""
        accumulator = cls()
        accumulator.update(reference, candidate)
        return accumulator.result()

    def result(self) -> dict[str, Any]:
        cosine = not self.scalar_rows and self.rows > 0
        return {
            "max_abs": self.max_abs if self.count else float("nan"),
            "rel_l2": float(np.sqrt(self.sq_diff) / np.sqrt(self.sq_ref)) if self.sq_ref > 0 else float(np.sqrt(self.sq_diff)),
            "cosine_mean": self.cos_sum / self.rows if cosine else None,
            "cosine_min": self.cos_min if cosine else None,
            "error_quantiles": {f"p{100 * q:g}": self.quantile(q) for q in QUANTILES},
            "elements": self.count,
            **self.nonfinite,
            "histogram": self.histogram(),
        }


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    dot = np.einsum("ij,ij->i", a, b)
    sq_a, sq_b = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b)
    both_zero = (sq_a == 0) & (sq_b == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = dot / np.sqrt(sq_a * sq_b)
    return np.where(both_zero, 1.0, np.nan_to_num(cosine, nan=0.0))
