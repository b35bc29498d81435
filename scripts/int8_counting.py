"""Counting for INT8 on CPU (DESIGN.md, "Method for performance work"), imported by scripts/bench_int8.py: FLOPs,
the Gemm share of FP32 kernel time (onnxruntime's profiler), the U8S8 / FP32 time ratio r of a tower's own Gemm
shapes and of a large MatMul, and the Amdahl bound 1 / ((1 - p) + p / r) on INT8's speedup. Timing goes
through the library's session factory (spinning off) and interleaved timer."""

from __future__ import annotations

import collections
import json
import tempfile
from pathlib import Path

import numpy as np

GEMM_OPS = ("Gemm", "FusedGemm", "MatMul", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat")
PEAK_SHAPE = (4096, 1024, 1024)


def session(model, profile_prefix: str | None = None):
    """A CPU session as a bundle opens it, with intra-op spinning off (sessions are timed in turn)."""
    from toolkit.backends.ort.loader import ort_session

    return ort_session(model, spinning=False, profile_prefix=profile_prefix)


def op_profiles(models: dict, feeds: dict, runs: int, folder: Path) -> dict[str, dict[str, float]]:
    """Kernel milliseconds per run of each op type of each model, from onnxruntime's profiler, the models run
    interleaved; each op type's fastest run (the least disturbed by other processes on a shared machine), plus
    `total` and `gemm`, their sums over all ops and over Gemm-like ops."""
    timed = {name: session(model, profile_prefix=str(folder / f"profile-{name}")) for name, model in models.items()}
    for _ in range(3 + runs):
        for sess in timed.values():
            sess.run(None, feeds)
    profiles = {}
    for name, sess in timed.items():
        events = json.loads(Path(sess.end_profiling()).read_text())
        starts = [e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-runs:]
        per_op: dict[str, np.ndarray] = collections.defaultdict(lambda: np.zeros(runs))
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= starts[0]:
                run = int(np.searchsorted(starts, event["ts"], side="right")) - 1
                per_op[event["args"]["op_name"]][run] += event["dur"] / 1e3
        profile = {op: float(ms.min()) for op, ms in per_op.items()}
        profile["gemm"] = sum(ms for op, ms in profile.items() if op in GEMM_OPS)
        profile["total"] = sum(ms for op, ms in profile.items() if op != "gemm")
        profiles[name] = profile
    return profiles


def _graph(nodes, inputs, outputs, initializers):
    from onnx import helper

    graph = helper.make_graph(nodes, "bench", inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _time_pair(fp32, int8, iterations: int) -> tuple[float, float]:
    """Fastest ms of each side, timed interleaved (a peak is the best the machine does)."""
    from toolkit.backends.timing import time_interleaved

    (a, feeds_a), (b, feeds_b) = fp32, int8
    samples = time_interleaved({"fp32": lambda: a.run(None, feeds_a), "int8": lambda: b.run(None, feeds_b)},
                               warmup=2, iterations=iterations)  # fmt: skip
    return float(samples["fp32"].min()), float(samples["int8"].min())


def matmul_peak(m: int, k: int, n: int, iterations: int = 8) -> tuple[float, float]:
    """(FP32 GFLOP/s, U8S8 GOP/s) of one [m,k]x[k,n] MatMul in onnxruntime: MatMul vs MatMulInteger."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    fp32 = _graph([helper.make_node("MatMul", ["a", "w"], ["y"])],
                  [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                  [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")])  # fmt: skip
    u8s8 = _graph([helper.make_node("MatMulInteger", ["a", "w", "a_zero"], ["y"])],
                  [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
                  [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
                  [numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "w"),
                   numpy_helper.from_array(np.array(128, np.uint8), "a_zero")])  # fmt: skip
    a = rng.standard_normal((m, k)).astype(np.float32)
    a8 = rng.integers(0, 256, (m, k)).astype(np.uint8)
    f, q = _time_pair((session(fp32), {"a": a}), (session(u8s8), {"a": a8}), iterations)
    return 2 * m * k * n / f / 1e6, 2 * m * k * n / q / 1e6


def gemm_shapes(model) -> list[tuple[int, int]]:
    """(in, out) of every Gemm with a constant [out, in] (transB) or [in, out] weight, in graph order."""
    from onnx import numpy_helper

    weights = {init.name: numpy_helper.to_array(init).shape for init in model.graph.initializer}
    shapes = []
    for node in model.graph.node:
        if node.op_type == "Gemm" and node.input[1] in weights:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            out, k = weights[node.input[1]] if trans_b else weights[node.input[1]][::-1]
            shapes.append((k, out))
    return shapes


def gemm_shape_times(shapes: list[tuple[int, int]], batch: int, iterations: int = 40) -> tuple[float, float]:
    """Summed ms of the tower's Gemms run alone at `batch`: FP32 Gemm (+bias) vs U8S8 QGemm with per-channel
    8-bit weights and a uint8 output, as the INT8 graph runs them on VNNI."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    fp32_ms = int8_ms = 0.0
    def const(value, name):
        return numpy_helper.from_array(np.asarray(value), name)

    for k, n in shapes:
        fp32 = _graph([helper.make_node("Gemm", ["a", "w", "b"], ["y"], transB=1)],
                      [helper.make_tensor_value_info("a", TensorProto.FLOAT, [batch, k])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n])],
                      [const(rng.standard_normal((n, k)).astype(np.float32), "w"), const(np.zeros(n, np.float32), "b")])
        names = ["a", "a_scale", "a_zero", "w", "w_scale", "w_zero", "b", "y_scale", "y_zero"]
        qgemm = _graph([helper.make_node("QGemm", names, ["y"], transB=1, domain="com.microsoft")],
                       [helper.make_tensor_value_info("a", TensorProto.UINT8, [batch, k])],
                       [helper.make_tensor_value_info("y", TensorProto.UINT8, [batch, n])],
                       [const(np.float32(0.02), "a_scale"), const(np.uint8(128), "a_zero"),
                        const(rng.integers(-127, 128, (n, k)).astype(np.int8), "w"),
                        const(np.full(n, 0.01, np.float32), "w_scale"), const(np.zeros(n, np.int8), "w_zero"),
                        const(np.zeros(n, np.int32), "b"), const(np.float32(0.5), "y_scale"),
                        const(np.uint8(128), "y_zero")])  # fmt: skip
        a = rng.standard_normal((batch, k)).astype(np.float32)
        a8 = rng.integers(0, 256, (batch, k)).astype(np.uint8)
        f, q = _time_pair((session(fp32), {"a": a}), (session(qgemm), {"a": a8}), iterations)
        fp32_ms, int8_ms = fp32_ms + f, int8_ms + q
    return fp32_ms, int8_ms


def amdahl(gemm_share: float, gemm_speedup: float) -> float:
    """Whole-graph speedup when only the Gemm share of the time gets `gemm_speedup` faster."""
    return 1.0 / ((1.0 - gemm_share) + gemm_share / gemm_speedup)


def counting(model, int8, feeds: dict[str, np.ndarray], runs: int = 5) -> dict:
    """The counting of `model` (FP32) and its INT8 graph `int8` on `feeds` (one batch)."""
    import onnx

    from graphs.inspect import inspect_model

    batch = len(next(iter(feeds.values())))
    with tempfile.TemporaryDirectory(prefix="dcnc-count-") as folder:
        onnx.save(model, Path(folder) / "tower.onnx")
        flops = inspect_model(Path(folder) / "tower.onnx")["flops_per_sample"]["total"]
        profiles = op_profiles({"fp32": model, "int8": int8}, feeds, runs, Path(folder))
    fp32, quantized = profiles["fp32"], profiles["int8"]
    share = fp32["gemm"] / fp32["total"]
    f_ms, q_ms = gemm_shape_times(gemm_shapes(model), batch, iterations=runs)
    f_peak, q_peak = matmul_peak(*PEAK_SHAPE)
    return {
        "gflop_per_batch": flops * batch / 1e9, "fp32_kernels_ms": fp32["total"], "fp32_gemm_ms": fp32["gemm"],
        "gemm_share": share, "int8_kernels_ms": quantized["total"], "int8_gemm_ms": quantized["gemm"],
        "fp32_gflops": flops * batch / fp32["gemm"] / 1e6,
        "shapes_fp32_ms": f_ms, "shapes_u8s8_ms": q_ms, "r_shapes": f_ms / q_ms,
        "peak_fp32_gflops": f_peak, "peak_u8s8_gops": q_peak, "r_peak": q_peak / f_peak,
        "amdahl_shapes": amdahl(share, f_ms / q_ms), "amdahl_peak": amdahl(share, q_peak / f_peak),
        "kernels_ratio": fp32["total"] / quantized["total"],
        "int8_ops_ms": {op: ms for op, ms in sorted(quantized.items(), key=lambda x: -x[1]) if op not in ("total", "gemm")},
    }  # fmt: skip
