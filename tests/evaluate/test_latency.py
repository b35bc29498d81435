"""Interleaved latency measurement: order, percentiles, throughput, speedup and noise."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.backends.timing import CudaEventTimer, time_interleaved, timer_for
from toolkit.core.errors import DcncError
from toolkit.evaluate.latency import compare_latency, ratio_noise, summarize


class ScriptedTimer:
    """Runs the call and returns the next duration from a per-call script, so statistics are known exactly."""

    def __init__(self, durations: dict[str, list[float]]):
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


def test_speedup_is_reference_p50_over_candidate_p50():
    timer = ScriptedTimer({"ref": [4.0] * 12, "cand": [1.0] * 12})
    result = compare_latency({8: lambda: "ref"}, {8: lambda: "cand"}, warmup=0, iterations=12, timer=timer)
    assert result["8"]["speedup"] == pytest.approx(4.0)
    assert result["8"]["candidate"]["throughput"] == pytest.approx(8000.0)
    assert result["8"]["noise"] == 0.0  # a steady machine: every block has the same ratio


def test_noise_is_the_range_of_block_ratios():
    reference = np.array([2.0] * 4 + [2.0] * 4)
    candidate = np.array([1.0] * 4 + [1.2] * 4)  # ratio 0.5 in block 1, 0.6 in block 2; overall median 1.1/2
    assert ratio_noise(reference, candidate, blocks=2) == pytest.approx((0.6 - 0.5) / 0.55)


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
