"""t_cross, t_deep and t_parallel of a parallel tower: its branch subgraphs (graphs.branches.extract_branch) timed
alone and together on ORT CPU, interleaved, so the ratio says whether the runtime overlaps the two branches."""

from __future__ import annotations

import numpy as np
import onnx

from graphs.branches import analyze, extract_branch
from toolkit.backends.ort.loader import OrtOptions, ort_session
from toolkit.backends.timing import time_interleaved
from toolkit.core.errors import DcncError
from toolkit.core.machine import usable_cores

BRANCHES = ("cross", "deep", "parallel")


def time_branches(
    model: onnx.ModelProto, batch: int = 4096, repeats: int = 30, warmup: int = 3, threads: int | None = None
) -> dict:
    """Median latency (ms) of the cross branch alone, the deep branch alone, and both together, on ORT CPU
    (sequential executor, intra-op threads = cores unless `threads`), timed interleaved on one x0 of `batch` rows.

    ratio = t_parallel / max(t_cross, t_deep): 1.0 means the branches fully overlap, t_cross + t_deep over the
    max means they ran one after the other. serial_ratio = t_parallel / (t_cross + t_deep).
    """
    report = analyze(model)
    if not report.parallel:
        quantized = any(node.op_type == "QuantizeLinear" for node in model.graph.node)
        raise DcncError("branch timing is not measured on INT8 (Q/DQ) graphs: the branch analysis does not follow"
                        " Q/DQ pairs" if quantized else "branch timing needs a parallel tower (cross and deep on one x0)")
    if not report.x0_width:
        raise DcncError("branch timing needs a static x0 width")
    # three sessions take turns: a pool left spinning after its run would steal the cores from the next one
    sessions = {
        name: ort_session(extract_branch(model, name, report), options=OrtOptions(threads=threads), spinning=False,
                          where=f"{name} branch subgraph")
        for name in BRANCHES
    }  # fmt: skip
    dtype = np.float16 if sessions["cross"].get_inputs()[0].type == "tensor(float16)" else np.float32
    feeds = {report.x0: np.random.default_rng(0).standard_normal((batch, report.x0_width)).astype(dtype)}
    calls = {name: (lambda s=session: s.run(None, feeds)) for name, session in sessions.items()}
    samples = time_interleaved(calls, warmup, repeats)
    t = {name: float(np.median(times)) for name, times in samples.items()}
    return {
        "batch": batch,
        "threads": threads or usable_cores(),
        "t_cross_ms": t["cross"],
        "t_deep_ms": t["deep"],
        "t_parallel_ms": t["parallel"],
        "ratio": t["parallel"] / max(t["cross"], t["deep"]),
        "serial_ratio": t["parallel"] / (t["cross"] + t["deep"]),
    }
