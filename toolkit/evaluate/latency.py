"""Latency of a candidate against its reference: interleaved timing per batch size, percentiles, speedup, noise.

Both sides are timed in the same loop (toolkit.backends.timing.time_interleaved), alternating which goes first,
so drift in machine load (other jobs, thermal state) hits both equally and their ratio is meaningful on a
shared machine.

Noise: the samples of each side are cut into `blocks` runs of consecutive iterations; in each block the ratio
median(candidate) / median(reference) is taken, and the noise is (max - min) / overall ratio over the blocks,
i.e. how far the candidate/reference time ratio moved within this very run. A change from a baseline smaller
than that is not distinguishable from noise. (For 5 blocks the expected range is about 2.3 standard deviations
of a block ratio, which is about 3.7 standard errors of the difference of two full-run ratios: a bound that a
steady machine rarely crosses by chance.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from toolkit.backends.timing import TimedCall, Timer, time_interleaved, wall_timer

PERCENTILES = (50, 90, 99)
NOISE_METHOD = " ".join(__doc__.split("Noise:", 1)[1].split())  # what reports say the noise figure is


def summarize(samples_ms: np.ndarray, batch: int) -> dict[str, float]:
    """p50/p90/p99 and mean in ms, and throughput in samples per second (batch / mean time)."""
    p50, p90, p99 = np.percentile(samples_ms, PERCENTILES)
    mean = float(np.mean(samples_ms))
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": mean,
        "throughput": batch / (mean / 1e3) if mean > 0 else float("inf"),
        "iterations": len(samples_ms),
    }


def ratio_noise(reference_ms: np.ndarray, candidate_ms: np.ndarray, blocks: int = 5) -> float:
    """Relative range of the candidate/reference median-time ratio over consecutive blocks (module docstring)."""
    blocks = max(1, min(blocks, len(reference_ms)))
    ratios = [
        np.median(c) / np.median(r)
        for r, c in zip(np.array_split(reference_ms, blocks), np.array_split(candidate_ms, blocks))
    ]
    overall = np.median(candidate_ms) / np.median(reference_ms)
    return float((max(ratios) - min(ratios)) / overall)


def compare_latency(
    reference: dict[int, TimedCall],
    candidate: dict[int, TimedCall],
    warmup: int = 10,
    iterations: int = 100,
    timer: Timer = wall_timer,
    blocks: int = 5,
) -> dict[str, dict[str, Any]]:
    """Per batch size: reference and candidate statistics, speedup (reference p50 / candidate p50), noise.

    reference / candidate: per batch size, a zero-argument call running one batch with its inputs already in
    place (on the device for CUDA). Keys of the result are batch sizes as strings (JSON object keys).
    """
    result = {}
    for batch in sorted(reference):
        samples = time_interleaved(
            {"reference": reference[batch], "candidate": candidate[batch]}, warmup, iterations, timer
        )
        ref, cand = summarize(samples["reference"], batch), summarize(samples["candidate"], batch)
        result[str(batch)] = {
            "reference": ref,
            "candidate": cand,
            "speedup": ref["p50_ms"] / cand["p50_ms"] if cand["p50_ms"] > 0 else float("inf"),
            "noise": ratio_noise(samples["reference"], samples["candidate"], blocks),
        }
    return result
