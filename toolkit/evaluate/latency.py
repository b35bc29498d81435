"""Latency of a candidate against its reference: paired timing per batch size, a robust speedup with its
confidence interval, and a verdict that refuses to print a number the run cannot stand behind.

Both sides run in the same rounds (toolkit.backends.timing.time_interleaved: one call of each per round, the
order alternating), so round i gives a pair of times taken within milliseconds of each other and one ratio
reference_i / candidate_i. A stall from another process lands in a few rounds; the speedup is the median of
the per-round ratios, which a minority of stalled rounds cannot move (a ratio of two p50s can: measured 130x
"speedups" from one stalled block on a shared 2-core machine).

Noise: the 95% confidence interval of that median (a percentile bootstrap over the rounds, seeded), given as
its half-width relative to the speedup. When it is wider than the policy's tolerance, more rounds are timed
within the policy's time budget; if it is still too wide the verdict is "inconclusive", with the machine's
load, and gates that judge latency fail with that reason instead of passing on noise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.backends.timing import TimedCall, Timer, time_interleaved, wall_timer
from toolkit.core.errors import DcncError

PERCENTILES = (50, 90, 99)
NOISE_METHOD = " ".join(__doc__.split("Noise:", 1)[1].split())  # what reports say the noise figure is
CONCLUSIVE, INCONCLUSIVE = "conclusive", "inconclusive"
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class LatencyPolicy:
    """How sure a latency figure must be.

    tolerance: the widest 95% interval (half-width relative to the speedup) reported as a figure (default 10%).
    budget_s: seconds of extra rounds allowed per batch size to narrow a wider interval (default 3).
    max_rounds: cap on the rounds per batch size, extra ones included (default 2000).
    """

    tolerance: float = 0.10
    budget_s: float = 3.0
    max_rounds: int = 2000

    def __post_init__(self):
        if not 0 < self.tolerance < 1:
            raise DcncError(f"latency tolerance must be in (0, 1), got {self.tolerance}")
        if self.budget_s < 0 or self.max_rounds < 1:
            raise DcncError("latency budget must be >= 0 seconds and max rounds >= 1")


def summarize(samples_ms: np.ndarray, batch: int) -> dict[str, float]:
    """min, p50/p90/p99 and mean in ms, and throughput in samples per second (batch / mean time)."""
    p50, p90, p99 = np.percentile(samples_ms, PERCENTILES)
    mean = float(np.mean(samples_ms))
    return {
        "min_ms": float(np.min(samples_ms)),
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": mean,
        "throughput": batch / (mean / 1e3) if mean > 0 else float("inf"),
        "iterations": len(samples_ms),
    }


def paired_speedup(reference_ms: np.ndarray, candidate_ms: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """The median of per-round ratios reference_i / candidate_i, its 95% bootstrap interval and the interval's
    half-width relative to the median (`noise`)."""
    ratios = np.asarray(reference_ms, dtype=np.float64) / np.maximum(np.asarray(candidate_ms, dtype=np.float64), 1e-12)
    median = float(np.median(ratios))
    rng = np.random.default_rng(seed)
    medians = np.median(ratios[rng.integers(0, len(ratios), size=(BOOTSTRAP_RESAMPLES, len(ratios)))], axis=1)
    low, high = (float(v) for v in np.percentile(medians, (2.5, 97.5)))
    return {"speedup": median, "ci": [low, high], "noise": (high - low) / (2 * median) if median > 0 else float("inf")}


def time_pair(
    reference: TimedCall,
    candidate: TimedCall,
    warmup: int,
    iterations: int,
    timer: Timer = wall_timer,
    policy: LatencyPolicy = LatencyPolicy(),
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Time both calls in alternating rounds, adding rounds (in blocks of `iterations`) while the speedup's
    interval is wider than the policy allows and its budget lasts. Returns both sides' samples and the
    estimate with its verdict."""
    calls = {"reference": reference, "candidate": candidate}
    samples = time_interleaved(calls, warmup, iterations, timer)
    ref, cand = samples["reference"], samples["candidate"]
    estimate = paired_speedup(ref, cand)
    deadline = time.perf_counter() + policy.budget_s
    while estimate["noise"] > policy.tolerance and len(ref) < policy.max_rounds and time.perf_counter() < deadline:
        more = time_interleaved(calls, 0, min(iterations, policy.max_rounds - len(ref)), timer)
        ref, cand = np.concatenate([ref, more["reference"]]), np.concatenate([cand, more["candidate"]])
        estimate = paired_speedup(ref, cand)
    estimate["verdict"] = CONCLUSIVE if estimate["noise"] <= policy.tolerance else INCONCLUSIVE
    estimate["rounds"] = len(ref)
    return ref, cand, estimate


def compare_latency(
    reference: dict[int, TimedCall],
    candidate: dict[int, TimedCall],
    warmup: int = 10,
    iterations: int = 100,
    timer: Timer = wall_timer,
    policy: LatencyPolicy = LatencyPolicy(),
) -> dict[str, dict[str, Any]]:
    """Per batch size: both sides' statistics, the speedup (median of paired ratios) with its 95% interval,
    the noise (the interval's relative half-width), the rounds timed and the verdict.

    reference / candidate: per batch size, a zero-argument call running one batch with its inputs already in
    place (on the device for CUDA). Keys of the result are batch sizes as strings (JSON object keys).
    """
    result = {}
    for batch in sorted(reference):
        ref, cand, estimate = time_pair(reference[batch], candidate[batch], warmup, iterations, timer, policy)
        result[str(batch)] = {"reference": summarize(ref, batch), "candidate": summarize(cand, batch), **estimate}
    return result
