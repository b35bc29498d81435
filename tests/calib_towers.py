"""Tower graphs for the calibration tests: tests/zoo.py towers exported through graphs.export and the default
passes (canonical node names, as `dcnc export` writes them), plus a two-tower trained for a few seconds."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
from tower_graphs import loaded, zoo_graph

from graphs.export import tower_to_onnx
from graphs.passes.manager import run_passes


@functools.cache
def _tower_bytes(family: str, kind: str) -> bytes:
    return run_passes(zoo_graph(family, kind))[0].SerializeToString()  # the graph tests' export, passes run


def tower_graph(family: str = "retrieval", kind: str = "full") -> onnx.ModelProto:
    """A fresh copy of a zoo tower's FP32 graph after the default passes (retrieval: the query tower)."""
    return onnx.load_from_string(_tower_bytes(family, kind))


def random_feeds(model: onnx.ModelProto, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid random inputs for the graph: ids in [0, 4) (every zoo table has at least 7 rows), floats N(0, 1)."""
    from toolkit.core.onnxio import graph_inputs

    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in graph_inputs(model):
        shape = spec.concrete_shape(batch)
        if spec.dtype.startswith("int"):
            feeds[spec.name] = rng.integers(0, 4, size=shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], unfused: bool = False) -> list[np.ndarray]:
    """The graph's outputs on onnxruntime's CPU provider; `unfused`: with graph optimisations off, so a Q/DQ graph
    computes in float what an int32-accumulating kernel computes (a test of a lowering with 8-bit weights gets
    the same answer on an AVX2 CPU, whose fused kernel would saturate them, as on a VNNI one)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if unfused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def optimized_op_types(model: onnx.ModelProto, folder: Path) -> list[str]:
    """The op types of the graph onnxruntime's CPU provider actually runs (after its fusions)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(folder / "optimized.onnx").graph.node]


@functools.cache
def trained_two_tower(folder: str) -> dict:
    """The example two-tower trained for one epoch on the synthetic dataset (about 6 s), with its FP32 tower
    graphs, calibration and eval arrays. Cached per folder so a session trains it once."""
    from toolkit.example.data import load_dataset
    from toolkit.example.train import TrainConfig, train_two_tower
    from toolkit.model.checkpoint import load_checkpoint

    data = load_dataset("synthetic", seed=0)
    result = train_two_tower(data, folder, config=TrainConfig(epochs=1, batch_size=1024, lr=1e-2), quiet=True)
    model, _, _ = load_checkpoint(result["checkpoint"])
    graphs = {name: run_passes(tower_to_onnx(loaded(name, tower)))[0] for name, tower in model.towers().items()}
    return {
        "graphs": {name: g.SerializeToString() for name, g in graphs.items()},
        "calib": result["calib_data"],
        "eval": dict(np.load(result["eval_data"])),
    }
