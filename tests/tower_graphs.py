"""Tiny tower graphs for the graph tests: tests/zoo.py models exported through graphs.export, once per session."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import zoo
from torch import nn

from graphs.export import tower_to_onnx
from toolkit.model.loading import LoadedTower

zoo_model = zoo.zoo_model

FAMILY_TOWER = {"retrieval": "query", "ranking": "ranker", "projection": "engagement"}


def loaded(name: str, module: nn.Module) -> LoadedTower:
    return LoadedTower(name, module.eval(), list(module.input_specs), list(module.output_names))


@functools.cache
def _zoo_bytes(family: str, kind: str, structure: str) -> bytes:
    model, _ = zoo_model(family, kind, structure)
    name = FAMILY_TOWER[family]
    return tower_to_onnx(loaded(name, model.towers()[name])).SerializeToString()


def zoo_graph(family: str, kind: str = "full", structure: str = "parallel") -> onnx.ModelProto:
    """A fresh copy of the exported tower of one zoo model (retrieval: its query tower)."""
    return onnx.load_from_string(_zoo_bytes(family, kind, structure))


def zoo_feeds(family: str, kind: str = "full", structure: str = "parallel", batch: int = 16) -> dict[str, np.ndarray]:
    model, _ = zoo_model(family, kind, structure)
    name = FAMILY_TOWER[family]
    return loaded(name, model.towers()[name]).feeds(batch, seed=1)


@functools.cache
def _module_bytes(module: nn.Module, name: str) -> bytes:
    return tower_to_onnx(loaded(name, module)).SerializeToString()


def module_graph(module: nn.Module, name: str = "tower") -> onnx.ModelProto:
    """A fresh copy of `module` (with input_specs and output_names) exported, cached by module identity."""
    return onnx.load_from_string(_module_bytes(module, name))


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name on ONNX Runtime CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest per-row cosine similarity between two batches of outputs (NaN when either holds NaN/Inf)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    if a.shape[1] == 1:  # one value per row: the cosine of the whole batch
        a, b = a.T, b.T
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float((num / np.maximum(den, 1e-30)).min())
