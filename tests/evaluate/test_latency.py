"""Interleaved latency measurement: order, percentiles, throughput, speedup and noise."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np
import pytest

from toolkit.backends.timing import CudaEventTimer, time_interleaved, timer_for
from toolkit.core.errors import DcncError
from toolkit.evaluate.latency import (
    LatencyPolicy,
    compare_latency,
    paired_speedup,
    summarize,
    time_pair,
)


class ScriptedTimer:
    """Runs the call and returns the next duration from a per-call script, so statistics are known exactly."""

    def __init__(self, durations: dict[str, Iterable[float]]):
        self.durations = {name: iter(values) for name, values in durations.items()}

    def __call__(self, call) -> float:
        return next(self.durations[call()])


def test_rounds_alternate_which_side_runs_first():
    order: list[str] = []
    calls = {"reference": lambda: order.append("r"), "candidate": lambda: order.append("c")}
    time_interleaved(calls, warmup=1, iterations=4, timer=lambda call: call() or 1.0)
    assert "".join(order) == "rc" + "rc" + "cr" + "rc" + "cr"  # warm-up, then rotating rounds


def test_summary_percentiles_and_throughput_by_hand():
    samples = np.arange(1.0, 101.0)  # 1..100 ms
    stats = summarize(samples, batch=64)
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["throughput"] == pytest.approx(64 / 0.0505)  # batch over the mean time


def test_speedup_is_the_median_of_paired_ratios_which_stalled_rounds_do_not_move():
    # three rounds where another process stalled the candidate 100x: a p50 ratio over blocks would move
    reference = [4.0] * 20
    candidate = [1.0] * 17 + [100.0] * 3
    result = compare_latency({8: lambda: "ref"}, {8: lambda: "cand"}, warmup=0, iterations=20,
                             timer=ScriptedTimer({"ref": reference, "cand": candidate}))
    entry = result["8"]
    assert entry["speedup"] == pytest.approx(4.0) and entry["verdict"] == "conclusive"
    assert entry["candidate"]["throughput"] == pytest.approx(8 / (np.mean(candidate) / 1e3))
    assert entry["candidate"]["min_ms"] == 1.0 and entry["rounds"] == 20


def test_a_steady_machine_gives_a_zero_width_interval():
    estimate = paired_speedup(np.full(20, 2.0), np.full(20, 1.0))
    assert estimate["speedup"] == 2.0 and estimate["ci"] == [2.0, 2.0] and estimate["noise"] == 0.0


def test_the_interval_is_a_bootstrap_of_the_median_ratio():
    rng = np.random.default_rng(0)
    ratios = rng.lognormal(np.log(2.0), 0.1, 400)
    estimate = paired_speedup(ratios, np.ones(400))
    low, high = estimate["ci"]
    assert low < np.median(ratios) < high and (high - low) / 2 / np.median(ratios) == pytest.approx(estimate["noise"])
    assert 0.005 < estimate["noise"] < 0.03  # about 1.96 x 1.25 x 0.1 / sqrt(400) = 1.5 %


def test_a_noisy_pair_gets_more_rounds_until_its_interval_is_narrow_enough():
    # the first 10 rounds alternate ratios 1 and 4; every later round is a steady 2
    ref = itertools.chain([1.0, 4.0] * 5, itertools.repeat(2.0))
    timer = ScriptedTimer({"ref": ref, "cand": itertools.repeat(1.0)})
    *_, estimate = time_pair(lambda: "ref", lambda: "cand", 0, 10, timer, LatencyPolicy(tolerance=0.1, budget_s=60))
    assert estimate["rounds"] > 10 and estimate["verdict"] == "conclusive" and estimate["speedup"] == 2.0


def test_a_pair_too_noisy_for_the_budget_is_inconclusive():
    timer = ScriptedTimer({"ref": itertools.cycle([1.0, 4.0]), "cand": itertools.repeat(1.0)})
    *_, estimate = time_pair(lambda: "ref", lambda: "cand", 0, 10, timer, LatencyPolicy(tolerance=0.1, budget_s=0))
    assert estimate["rounds"] == 10 and estimate["verdict"] == "inconclusive" and estimate["noise"] > 0.1


def test_timing_needs_at_least_one_iteration():
    with pytest.raises(DcncError, match="iterations >= 1"):
        time_interleaved({"a": lambda: None}, warmup=0, iterations=0)


def test_unknown_device_is_refused():
    with pytest.raises(DcncError, match="cpu or cuda"):
        timer_for("tpu")


def test_cuda_timer_without_a_gpu_says_so():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(DcncError, match="no CUDA device"):
        CudaEventTimer()


@pytest.mark.gpu
def test_cuda_event_timer_measures_device_work():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x = torch.randn(4096, 4096, device="cuda")
    timer = CudaEventTimer()
    small = timer(lambda: x[:64, :64] @ x[:64, :64])
    large = timer(lambda: x @ x)
    assert large > small > 0
