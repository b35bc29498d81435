"""Latency of a candidate against its reference: interleaved timing per batch size, percentiles, speedup, noise.

Both sides are timed in the same loop, alternating which goes first, so drift in machine load (other jobs,
thermal state) hits both equally and their ratio is meaningful on a shared machine.

Noise: the samples of each side are cut into `blocks` runs of consecutive iterations; in each block the ratio
median(candidate) / median(reference) is taken, and the noise is (max - min) / overall ratio over the blocks,
i.e. how far the candidate/reference time ratio moved within this very run. A change from a baseline smaller
than that is not distinguishable from noise. (For 5 blocks the expected range is about 2.3 standard deviations
of a block ratio, which is about 3.7 standard errors of the difference of two full-run ratios: a bound that a
steady machine rarely crosses by chance.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from toolkit.core.errors import DcncError

PERCENTILES = (50, 90, 99)
TimedCall = Callable[[], Any]
Timer = Callable[[TimedCall], float]


def wall_timer(call: TimedCall) -> float:
    """Milliseconds one call takes on the host clock (CPU runners return when their outputs are ready)."""
    start = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - start) / 1e6


class CudaEventTimer:
    """Milliseconds one call takes on the GPU: CUDA events around it, with the device synchronised before and
    after, so work the call enqueues on any stream (ORT, TensorRT, torch) is inside the interval."""

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise DcncError("--device cuda: torch sees no CUDA device")
        self.torch = torch
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, call: TimedCall) -> float:
        self.torch.cuda.synchronize()
        self.start.record()
        call()
        self.torch.cuda.synchronize()  # the call may have used its own stream: wait for all of them
        self.end.record()
        self.end.synchronize()
        return float(self.start.elapsed_time(self.end))


def timer_for(device: str) -> Timer:
    if device == "cpu":
        return wall_timer
    if device == "cuda":
        return CudaEventTimer()
    raise DcncError(f"--device must be cpu or cuda, got {device!r}")


def time_interleaved(
    calls: dict[str, TimedCall], warmup: int, iterations: int, timer: Timer = wall_timer
) -> dict[str, np.ndarray]:
    """Run every call `warmup` times untimed, then `iterations` timed rounds; each round runs every call once,
    the order rotating by one each round. Returns each call's samples in milliseconds, in round order."""
    if iterations < 1 or warmup < 0:
        raise DcncError(f"latency: needs iterations >= 1 and warmup >= 0, got {iterations} and {warmup}")
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    samples = {name: np.empty(iterations) for name in names}
    for i in range(iterations):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name][i] = timer(calls[name])
    return samples


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


def device_call(runner: Any, feed: dict[str, np.ndarray], device: str) -> TimedCall:
    """A zero-argument call that runs one batch of `feed` on `runner`, for timing.

    On CPU it is `runner.infer(feed)`: numpy in, numpy out, as a CPU server uses it. On CUDA the inputs are
    put on the device once, beforehand, and the call runs only the model: a runner's own `device_call(feed)`
    when it has one; for the torch reference, the module on device tensors; for ONNX Runtime on CUDA, a session
    run with inputs and outputs bound to device memory; for TensorRT, the engine enqueued on bindings made once.
    """
    if device == "cpu":
        if hasattr(runner, "check_feed"):
            runner.check_feed(feed)  # once, here, not inside the timed loop
            return lambda: runner.infer(feed, check_inputs=False)
        return lambda: runner.infer(feed)
    if hasattr(runner, "device_call"):
        return runner.device_call(feed)
    kind = getattr(runner, "kind", None)
    if kind == "torch":
        return _torch_device_call(runner, feed)
    if kind == "ort" and getattr(runner, "uses_cuda", False):
        return _ort_device_call(runner, feed)
    if kind == "tensorrt":
        return _trt_device_call(runner, feed)
    raise DcncError(f"{getattr(runner, 'name', runner)}: cannot time it on CUDA with inputs on the device")


def _torch_device_call(runner: Any, feed: dict[str, np.ndarray]) -> TimedCall:
    import torch

    module = runner.module
    tensors = [torch.from_numpy(np.ascontiguousarray(feed[s.name])).to(runner.device) for s in module.input_specs]

    def call() -> Any:
        with torch.inference_mode():
            return module(*tensors)

    return call


def _ort_device_call(runner: Any, feed: dict[str, np.ndarray]) -> TimedCall:
    import onnxruntime as ort

    session, device_id = runner.session, getattr(runner, "device_id", 0)
    binding = session.io_binding()
    inputs = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), "cuda", device_id) for n, a in feed.items()}
    for name, value in inputs.items():
        binding.bind_ortvalue_input(name, value)
    for node in session.get_outputs():
        binding.bind_output(node.name, "cuda", device_id)
    return lambda: session.run_with_iobinding(binding)


def _trt_device_call(runner: Any, feed: dict[str, np.ndarray]) -> TimedCall:
    # TrtRunner._bind copies the inputs to the device and sets every tensor address once; what is timed after
    # that is the enqueue and the kernels. Reusing it keeps one copy of the binding logic.
    buffers = runner._bind(feed)

    def call() -> Any:
        runner._execute()
        runner.stream.synchronize()
        return buffers

    return call
