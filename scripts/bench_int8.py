"""Benchmark (not a test): the trained example two-tower as FP32 and INT8 ONNX Runtime CPU bundles, beside the
counting that bounds what INT8 can gain on this machine.

Counting first (DESIGN.md, "Method for performance work"), at --batch (default 4096):
- FLOPs per sample of each tower (graphs.inspect) and the share of the FP32 bundle's time spent in Gemm/MatMul
  (onnxruntime's profiler, kernel time summed by op type, median over runs);
- the machine's MatMul peaks in onnxruntime: a large FP32 MatMul against its U8S8 MatMulInteger form, and the
  tower's own Gemm shapes alone, FP32 Gemm against U8S8 QGemm (uint8 out, as the INT8 graph runs them);
- the Amdahl bound on INT8's speedup, 1 / ((1 - p) + p / r): p the Gemm share of FP32 time, r the U8S8 / FP32
  time ratio of those Gemms, everything else assumed to cost what it costs in FP32.
Then what the INT8 graph runs after onnxruntime's fusions (op counts, time outside QGemm), and per candidate
recall@100 of the two-tower against FP32 and latency: INT8 (the bundle `dcnc build --precision int8` writes),
INT8 with embedding tables quantized, INT8 with the layers sensitivity analysis keeps in FP32 for
--min-metric-ratio, and onnxruntime's dynamic quantization (MatMulInteger, activations quantized at run time).

    .venv/bin/python scripts/bench_int8.py runs/example [--method minmax] [--repeats 3] [--iterations 30]

Timing: every candidate and FP32 run interleaved (the order rotating each round), --repeats times; each repeat
gives a median, the speedup is reported per repeat (the machine is shared: ratios within a repeat hold, absolute
times drift). Sessions are created with intra-op spinning off: timed in turn, an idle session's spinning threads
steal the cores from the one being timed (on 2 cores that distorted FP32 vs INT8 by up to 10x).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np

GEMM_OPS = ("Gemm", "FusedGemm", "MatMul", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
            "DynamicQuantizeMatMul")  # fmt: skip
PEAK_SHAPE = (4096, 1024, 1024)


def session(model, profile_prefix: str | None = None, optimized: Path | None = None):
    """A CPU session as the bundle opens it (sequential, intra-op threads = cores), spinning off."""
    from toolkit.backends.ort.loader import ort_session

    return ort_session(model, spinning=False, optimized_model_path=optimized, profile_prefix=profile_prefix)


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
    from toolkit.backends.latency import time_interleaved

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
                  [numpy_helper.from_array(rng.integers(-63, 64, (k, n)).astype(np.int8), "w"),
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
    7-bit weights and a uint8 output, as the INT8 graph runs them."""
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
                        const(rng.integers(-63, 64, (n, k)).astype(np.int8), "w"),
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


def dynamic_int8(model, folder: Path):
    """onnxruntime's dynamic quantization of `model`: int8 weights, activations quantized at run time."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, out = folder / "dynamic_in.onnx", folder / "dynamic.onnx"
    onnx.save(model, source)
    quantize_dynamic(source, out, op_types_to_quantize=["Gemm", "MatMul"], weight_type=QuantType.QInt8,
                     reduce_range=True)  # fmt: skip  # 7-bit weights, as for static: no vpmaddubsw saturation
    return onnx.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("example", type=Path, help="folder with two_tower.pt, two_tower_eval.npz, *_calib.npz")
    parser.add_argument("--method", default="minmax")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--iterations", type=int, default=30, help="timed rounds per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-metric-ratio", type=float, default=0.999)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dcnc-bench-int8-") as work:
        bench(args, Path(work))


def bench(args: argparse.Namespace, work: Path) -> None:
    import onnx

    from calibration.cache import calibrated_ranges
    from calibration.qdq import quantize_with_ranges
    from calibration.reader import load_calibration
    from calibration.sensitivity import sensitivity
    from graphs.export import export_model
    from graphs.inspect import inspect_model
    from toolkit.backends.latency import time_interleaved
    from toolkit.commands.build import build_bundle
    from toolkit.core.machine import usable_cores
    from toolkit.core.onnxio import graph_inputs
    from toolkit.evaluate.metrics import exact_top_k, recall_at_k
    from toolkit.evaluate.task_metrics import recall_metric
    from toolkit.model.loading import load_model

    evaluation = dict(np.load(args.example / "two_tower_eval.npz"))
    towers = ("query", "item")
    side = {t: {k.split("/", 1)[1]: v for k, v in evaluation.items() if k.startswith(f"{t}/")} for t in towers}
    rng = np.random.default_rng(0)
    batch = {t: {k: v[rng.integers(0, len(v), args.batch)] for k, v in feeds.items()} for t, feeds in side.items()}

    export_model(load_model(str(args.example / "two_tower.pt")), work / "towers", validate=False)
    build_bundle(work / "towers", work / "fp32")
    build_bundle(work / "towers", work / "int8", precision="int8", calib=args.example, calib_method=args.method)
    fp32 = {t: onnx.load(work / "fp32" / f"{t}.onnx") for t in towers}
    candidates = {"int8": {t: onnx.load(work / "int8" / f"{t}.onnx") for t in towers}}

    def embed(models):
        return {t: session(m).run(None, side[t])[0] for t, m in models.items()}

    def recall(emb):
        return recall_at_k(exact_top_k(emb["query"], [emb["item"]], 100).ids, evaluation["relevance"], [100])[100]

    print(f"machine: {usable_cores()} cores; batch {args.batch}; method {args.method}")
    print("== counting")
    profiles, shape_times = {}, {}
    for tower in towers:
        flops = inspect_model(work / "fp32" / f"{tower}.onnx")["flops_per_sample"]
        models = {"fp32": fp32[tower], "int8": candidates["int8"][tower]}
        profiles[tower] = op_profiles(models, batch[tower], 20, work)
        p = profiles[tower]["fp32"]
        shape_times[tower] = gemm_shape_times(gemm_shapes(fp32[tower]), args.batch)
        print(f"{tower}: {flops['total']:,} FLOPs/sample ({flops['total'] * args.batch / 1e9:.2f} GFLOP per batch);"
              f" FP32 kernels {p['total']:.2f} ms, Gemm {p['gemm']:.2f} ms ({p['gemm'] / p['total']:.0%});"
              f" {p['gemm'] and flops['total'] * args.batch / p['gemm'] / 1e6:.0f} GFLOP/s in its Gemms")
    f_peak, q_peak = matmul_peak(*PEAK_SHAPE)
    print(f"peak, MatMul {'x'.join(map(str, PEAK_SHAPE))}: FP32 {f_peak:.0f} GFLOP/s, U8S8 MatMulInteger"
          f" {q_peak:.0f} GOP/s: r = {q_peak / f_peak:.2f}")
    for tower in towers:
        p, (f_ms, q_ms) = profiles[tower]["fp32"], shape_times[tower]
        share = p["gemm"] / p["total"]
        print(f"{tower}: its Gemm shapes alone: FP32 {f_ms:.2f} ms, QGemm {q_ms:.2f} ms: r = {f_ms / q_ms:.2f};"
              f" Amdahl bound {amdahl(share, f_ms / q_ms):.2f}x (at the peak r: {amdahl(share, q_peak / f_peak):.2f}x,"
              f" Gemms free: {1 / (1 - share):.2f}x)")

    kept, embeddings, dynamic = {}, {}, {}
    fp32_emb = embed(fp32)
    base = recall(fp32_emb)
    for tower in towers:
        other = "item" if tower == "query" else "query"
        data = load_calibration(args.example / f"{tower}_calib.npz", graph_inputs(fp32[tower]))
        ranges, _, _, _ = calibrated_ranges(fp32[tower], data, args.method)
        metric = recall_metric(100, evaluation["relevance"], fp32_emb[other], tower)
        report = sensitivity(fp32[tower], ranges, side[tower], metric, "recall@100", "cpu", "layer",
                             args.min_metric_ratio, time_latency=False)  # fmt: skip
        kept[tower] = quantize_with_ranges(fp32[tower], ranges, "cpu", keep_fp32=report.keep_fp32)[0]
        embeddings[tower] = quantize_with_ranges(fp32[tower], ranges, "cpu", quantize_embeddings=True)[0]
        dynamic[tower] = dynamic_int8(fp32[tower], work)
        curve = ", ".join(f"{len(p.kept)}:{p.ratio:.4f}" for p in report.curve)
        print(f"{tower} sensitivity (layers kept fp32: recall ratio) {curve}; keep {report.curve[-1].kept}")
    candidates.update({"int8+embeddings": embeddings, "int8+sensitivity": kept, "dynamic": dynamic})

    print("== the INT8 graph onnxruntime runs")
    for tower in towers:
        optimized = work / f"{tower}.int8.optimized.onnx"
        session(candidates["int8"][tower], optimized=optimized)
        ops = collections.Counter(node.op_type for node in onnx.load(optimized).graph.node)
        f, p = profiles[tower]["fp32"], profiles[tower]["int8"]
        qdq_ms = sum(p.get(op, 0.0) for op in ("QuantizeLinear", "DequantizeLinear"))
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in sorted(p.items(), key=lambda x: -x[1])
                        if op not in ("total", "gemm"))[:160]  # fmt: skip
        print(f"{tower}: {dict(ops)}")
        print(f"{tower}: kernels {p['total']:.2f} ms, integer Gemms {p['gemm']:.2f} ms, Q/DQ {qdq_ms:.2f} ms | {top}")
        print(f"{tower}: Gemms {f['gemm']:.2f} -> {p['gemm']:.2f} ms ({f['gemm'] / p['gemm']:.2f}x), the rest"
              f" {f['total'] - f['gemm']:.2f} -> {p['total'] - p['gemm']:.2f} ms; ceiling with everything but the"
              f" integer Gemms free: {f['total'] / p['gemm']:.2f}x")

    print(f"== FP32 recall@100 {base:.4f}; latency at batch {args.batch}, {args.repeats} interleaved repeats")
    recalls = {name: recall(embed(models)) / base for name, models in candidates.items()}
    times = {name: {t: [] for t in towers} for name in ["fp32", *candidates]}
    fastest = {name: {t: np.inf for t in towers} for name in ["fp32", *candidates]}
    for _ in range(args.repeats):
        for tower in towers:
            sessions = {"fp32": session(fp32[tower])} | {n: session(m[tower]) for n, m in candidates.items()}
            samples = time_interleaved({n: (lambda s=s, t=tower: s.run(None, batch[t])) for n, s in sessions.items()},
                                       warmup=5, iterations=args.iterations)  # fmt: skip
            for name in sessions:
                times[name][tower].append(float(np.median(samples[name])))
                fastest[name][tower] = min(fastest[name][tower], float(samples[name].min()))
    for name in candidates:
        line = [f"{name}: recall@100 ratio {recalls[name]:.4f}"]
        for tower in towers:
            f, q = np.array(times["fp32"][tower]), np.array(times[name][tower])
            line.append(f"{tower} fp32 {np.median(f):.2f} ms {name} {np.median(q):.2f} ms speedup"
                        f" {np.median(f / q):.2f}x ({' '.join(f'{x:.2f}' for x in f / q)};"
                        f" fastest {fastest['fp32'][tower]:.2f} / {fastest[name][tower]:.2f} ms)")
        fp32_both = np.add(times["fp32"]["query"], times["fp32"]["item"])
        both = fp32_both / np.add(times[name]["query"], times[name]["item"])
        line.append(f"two towers {np.median(both):.2f}x")
        print("; ".join(line))


if __name__ == "__main__":
    main()
