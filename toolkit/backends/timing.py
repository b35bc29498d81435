"""Timing primitives: the host-clock and CUDA-event timers, interleaved rounds of several calls (so drift in machine
load hits all of them alike), and calls that run one batch with its inputs already on the device."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from toolkit.core.errors import DcncError

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


def device_call(runner: Any, feed: dict[str, np.ndarray], device: str) -> TimedCall:
    """A zero-argument call that runs one batch of `feed` on `runner`, for timing.

    On CPU it is `runner.infer(feed)`: numpy in, numpy out, as a CPU server uses it. On CUDA it is the runner's
    own `device_call(feed)`: inputs put on the device once, beforehand, and only the model run in the call (the
    torch module on device tensors, an ONNX Runtime session on bound device memory, a TensorRT engine enqueued
    on an execution context of its own per batch size). Calls for several batch sizes may be made before any is
    timed: each keeps its own bindings.
    """
    if device == "cpu":
        if hasattr(runner, "check_feed"):
            runner.check_feed(feed)  # once, here, not inside the timed loop
            return lambda: runner.infer(feed, check_inputs=False)
        return lambda: runner.infer(feed)
    if hasattr(runner, "device_call"):
        return runner.device_call(feed)
    raise DcncError(f"{getattr(runner, 'name', runner)}: cannot time it on CUDA with inputs on the device")
