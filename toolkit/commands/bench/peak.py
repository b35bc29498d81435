"""The measured peak of one large MatMul in a runtime and precision: the ceiling a tower's GFLOP/s is read against.

DESIGN.md's method for performance work: count the tower's FLOPs, measure the machine's peak in the same
runtime, and report time over that floor. The peak is one square MatMul (n x n by n x n, 2 n^3 operations),
timed with the same timers and session settings as the benchmark's runners:

- torch: `a @ b` on the device (fp32; fp16 / bf16 on CUDA; int8 via torch._int_mm on CUDA).
- ort / ort-cuda: a one-node ONNX graph, MatMul (fp32, fp16) or MatMulInteger (uint8 x int8, the U8S8 kernels
  dcnc's CPU INT8 graphs use), in a session made like the benchmark's (sequential, spinning off).

For int8 the figure counts integer operations (GOP/s); it is reported under the same key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from toolkit.backends.timing import device_call, time_interleaved, timer_for
from toolkit.core.errors import DcncError

# Big enough to reach the kernels' steady state, small enough to time in well under a second.
DEFAULT_N = {"cpu": 1024, "cuda": 8192}
PEAK_PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass
class Peak:
    """GFLOP/s (GOP/s for int8) of one n x n MatMul from the fastest of `repeats` timed calls: a peak is the best
    the runtime does (on a shared machine the median of a long call mostly measures who else was running);
    the median is kept beside it as gflops_median."""

    runtime: str  # "torch", "ort" or "ort-cuda"
    device: str
    precision: str
    n: int
    best_ms: float
    median_ms: float
    gflops: float
    gflops_median: float
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def peak_key(runtime: str, device: str, precision: str) -> str:
    return f"{runtime}:{device}:{precision}"


def _from_samples(runtime: str, device: str, precision: str, n: int, samples_ms: np.ndarray) -> Peak:
    best, median = float(np.min(samples_ms)), float(np.median(samples_ms))
    gflops = 2 * n**3 / 1e9
    return Peak(runtime, device, precision, n, best, median, gflops / (best / 1e3), gflops / (median / 1e3), len(samples_ms))


def torch_matmul_peak(
    precision: str = "fp32", device: str = "cpu", n: int | None = None, repeats: int = 10, warmup: int = 2
) -> Peak:
    """Peak of `a @ b` in torch on `device` (inputs already there; CUDA timed with events)."""
    import torch

    n = n or DEFAULT_N[device]
    if precision not in PEAK_PRECISIONS:
        raise DcncError(f"matmul peak: unknown precision {precision!r} (choose {', '.join(PEAK_PRECISIONS)})")
    if device == "cpu" and precision != "fp32":
        raise DcncError(f"matmul peak: torch {precision} on cpu is not a precision dcnc benchmarks")
    generator = torch.Generator().manual_seed(0)
    if precision == "int8":
        a = torch.randint(-128, 127, (n, n), dtype=torch.int8, generator=generator).to(device)
        b = torch.randint(-128, 127, (n, n), dtype=torch.int8, generator=generator).to(device)

        def call():
            return torch._int_mm(a, b)

    else:
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)

        def call():
            return a @ b

    samples = time_interleaved({"matmul": call}, warmup, repeats, timer_for(device))["matmul"]
    return _from_samples("torch", device, precision, n, samples)


def matmul_graph(precision: str, n: int):
    """A one-node ONNX graph multiplying two n x n inputs `a` and `b` in `precision` (int8: MatMulInteger, U8S8)."""
    from onnx import TensorProto, helper

    if precision == "int8":
        node, a_type, b_type, out_type = "MatMulInteger", TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32
    elif precision in ("fp32", "fp16", "bf16"):
        a_type = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[precision]
        node, b_type, out_type = "MatMul", a_type, a_type
    else:
        raise DcncError(f"matmul peak: unknown precision {precision!r} (choose {', '.join(PEAK_PRECISIONS)})")
    graph = helper.make_graph(
        [helper.make_node(node, ["a", "b"], ["c"])],
        f"matmul_{precision}_{n}",
        [helper.make_tensor_value_info("a", a_type, [n, n]), helper.make_tensor_value_info("b", b_type, [n, n])],
        [helper.make_tensor_value_info("c", out_type, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # what onnxruntime 1.2x reads
    return model


def _matmul_feed(precision: str, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if precision == "int8":
        return {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-128, 127, (n, n), dtype=np.int8)}
    dtype = np.float16 if precision == "fp16" else np.float32
    return {"a": rng.standard_normal((n, n)).astype(dtype), "b": rng.standard_normal((n, n)).astype(dtype)}


def ort_matmul_peak(
    precision: str = "fp32",
    backend: str = "ort",
    n: int | None = None,
    threads: int | None = None,
    repeats: int = 10,
    warmup: int = 2,
) -> Peak:
    """Peak of a one-MatMul graph in ONNX Runtime: `ort` (CPU, timed on the host clock) or `ort-cuda` (inputs
    bound on the device, timed with CUDA events). Raises DcncError when the runtime has no kernel for it."""
    from toolkit.backends.ort.loader import OrtOptions, ort_session
    from toolkit.backends.ort.runner import OrtRunner

    device = "cuda" if backend == "ort-cuda" else "cpu"
    n = n or DEFAULT_N[device]
    if precision == "bf16":
        raise DcncError("matmul peak: ONNX Runtime has no bfloat16 MatMul kernel here")
    session = ort_session(matmul_graph(precision, n), backend, OrtOptions(threads=threads), spinning=False,
                          where=f"{precision} MatMul")
    feed = _matmul_feed(precision, n)
    if device == "cpu":
        def call():
            return session.run(None, feed)

    else:  # the inputs bound in device memory once, as device_call does for the benchmark's ORT runners
        runner = OrtRunner(session, name=f"{precision} MatMul")
        runner.activate()
        call = device_call(runner, feed, device)
    samples = time_interleaved({"matmul": call}, warmup, repeats, timer_for(device))["matmul"]
    return _from_samples(backend, device, precision, n, samples)


def measure_peak(runtime: str, device: str, precision: str, threads: int | None = None, n: int | None = None) -> Peak:
    """The peak for a runner's runtime: torch, ort, ort-cuda; TensorRT is read against torch's cuBLAS peak on
    the same GPU (building a one-layer engine per precision would cost more than the benchmark itself)."""
    if runtime in ("torch", "tensorrt"):
        return torch_matmul_peak(precision, device, n)
    if runtime in ("ort", "ort-cuda"):
        return ort_matmul_peak(precision, runtime, n, threads)
    raise DcncError(f"matmul peak: unknown runtime {runtime!r}")
