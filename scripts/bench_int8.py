"""Benchmark (not a test): the trained example two-tower as an FP32 and an INT8 ONNX Runtime CPU bundle.

Reports, at batch 4096: per-tower latency of both bundles (ORT sequential executor, intra-op threads = cores,
timed interleaved after warm-up) and recall@100 of the two-tower with INT8 towers against FP32 towers; then
the same with the layers sensitivity analysis keeps in FP32 for --min-metric-ratio.

    .venv/bin/python scripts/bench_int8.py runs/example [--method minmax] [--min-metric-ratio 0.999]

Sessions are created with intra-op spinning off: timed in turn, an idle session's spinning threads steal the
cores from the one being timed (on 2 cores that distorted FP32 vs INT8 by up to 10x).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("example", type=Path, help="folder with two_tower.pt, two_tower_eval.npz, *_calib.npz")
    parser.add_argument("--method", default="minmax")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--min-metric-ratio", type=float, default=0.999)
    args = parser.parse_args()

    import onnx
    import onnxruntime as ort

    from calibration.calibrate import calibrated_ranges
    from calibration.qdq import quantize_with_ranges
    from calibration.reader import graph_input_specs, load_calibration
    from calibration.sensitivity import recall_metric, sensitivity
    from graphs.export import export_model
    from toolkit.backends.ort.loader import OrtOptions, session_options, usable_cores
    from toolkit.build import build_bundle
    from toolkit.latency import time_interleaved
    from toolkit.loading import load_model
    from toolkit.metrics import exact_top_k, recall_at_k

    def session(model):
        options = session_options(OrtOptions())
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    evaluation = dict(np.load(args.example / "two_tower_eval.npz"))
    side = {t: {k.split("/", 1)[1]: v for k, v in evaluation.items() if k.startswith(f"{t}/")} for t in ("query", "item")}
    rng = np.random.default_rng(0)
    batch = {t: {k: v[rng.integers(0, len(v), args.batch)] for k, v in feeds.items()} for t, feeds in side.items()}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_model(load_model(str(args.example / "two_tower.pt")), tmp / "towers", validate=False)
        build_bundle(tmp / "towers", tmp / "fp32")
        build_bundle(tmp / "towers", tmp / "int8", precision="int8", calib=args.example)
        fp32 = {t: onnx.load(tmp / "fp32" / f"{t}.onnx") for t in side}
        int8 = {t: onnx.load(tmp / "int8" / f"{t}.onnx") for t in side}

    def embed(models):
        return {t: session(m).run(None, side[t])[0] for t, m in models.items()}

    def recall(emb):
        return recall_at_k(exact_top_k(emb["query"], [emb["item"]], 100).ids, evaluation["relevance"], [100])[100]

    fp32_emb = embed(fp32)
    base = recall(fp32_emb)
    print(f"machine: {usable_cores()} cores; batch {args.batch}; method {args.method}")
    print(f"FP32 recall@100 {base:.4f}")

    kept = {}
    for tower in side:
        other = "item" if tower == "query" else "query"
        data = load_calibration(args.example / f"{tower}_calib.npz", graph_input_specs(fp32[tower]))
        ranges, _, _, _ = calibrated_ranges(fp32[tower], data, args.method)
        metric = recall_metric(100, evaluation["relevance"], fp32_emb[other], tower)
        report = sensitivity(fp32[tower], ranges, side[tower], metric, "recall@100", "cpu", "layer",
                             args.min_metric_ratio, time_latency=False)  # fmt: skip
        kept[tower] = quantize_with_ranges(fp32[tower], ranges, "cpu", keep_fp32=report.keep_fp32)[0]
        curve = ", ".join(f"{len(p.kept)}:{p.ratio:.4f}" for p in report.curve)
        print(f"{tower} sensitivity (layers kept fp32: recall ratio) {curve}; keep {report.curve[-1].kept}")

    for label, candidate in (("int8", int8), ("int8+sensitivity", kept)):
        ratio = recall(embed(candidate)) / base
        line = [f"{label}: recall@100 ratio {ratio:.4f}"]
        for tower in side:
            ref, cand = session(fp32[tower]), session(candidate[tower])
            samples = time_interleaved(
                {"fp32": lambda r=ref, t=tower: r.run(None, batch[t]), "int8": lambda c=cand, t=tower: c.run(None, batch[t])},
                warmup=5, iterations=args.iterations,
            )  # fmt: skip
            f, q = np.median(samples["fp32"]), np.median(samples["int8"])
            line.append(f"{tower} fp32 {f:.2f} ms int8 {q:.2f} ms speedup {f / q:.2f}x")
        print("; ".join(line))


if __name__ == "__main__":
    main()
