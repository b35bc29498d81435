"""Shared cases of the verify tests: numpy stand-ins for towers, a ranking data set, and a whole end-to-end
case (checkpoint, ONNX export, a faithful and a broken bundle, evaluation data) for the CLI and report tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from toolkit.commands.build import build_bundle
from toolkit.commands.export import export_model
from toolkit.core.signature import random_inputs
from toolkit.evaluate.evaldata import RankingEval
from toolkit.evaluate.latency import LatencyPolicy
from toolkit.evaluate.verify import VerifyOptions
from toolkit.model.checkpoint import save_checkpoint
from toolkit.model.loading import load_model
from toolkit.model.spec import (
    CrossSpec,
    DenseFeature,
    ModelSpec,
    SparseFeature,
    TowerSpec,
)
from toolkit.model.zoo.families import build_model

# no extra latency rounds: these tests are not about timing, and stand-in towers time noisily
FAST = VerifyOptions(ks=(1, 3, 10), batch_sizes=(1, 8), eval_batch=16, item_chunk=50, warmup=1, iterations=5,
                     policy=LatencyPolicy(budget_s=0))


class EmbeddingTower:
    """embedding = normalize(dense @ weight): a stand-in for a retrieval tower."""

    def __init__(self, weight: np.ndarray, batch_range: tuple[int, int] | None = None):
        self.weight, self.batch_range, self.calls = weight, batch_range, []

    def infer(self, feed):
        self.calls.append(len(feed["dense"]))
        x = feed["dense"] @ self.weight
        return {"embedding": (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)}


class LogitTower:
    """logit = dense @ w (and its sigmoid): a stand-in for a ranker."""

    def __init__(self, w: np.ndarray):
        self.w = w

    def infer(self, feed):
        logit = (feed["dense"] @ self.w).astype(np.float32)
        return {"logit": logit, "probability": 1 / (1 + np.exp(-logit))}


def ranking_case(rows: int = 400):
    rng = np.random.default_rng(3)
    w = rng.standard_normal(5)
    dense = rng.standard_normal((rows, 5)).astype(np.float32)
    labels = ((dense @ w + rng.standard_normal(rows)) > 0).astype(np.float32)
    return w, RankingEval({"dense": dense}, {"logit": labels})



CLI_FAST = ["--k", "1,5", "--batch-sizes", "1,16", "--iterations", "3", "--warmup", "1", "--no-branches",
            "--latency-budget", "0"]


def tower_spec(prefix: str) -> TowerSpec:
    return TowerSpec(sparse=[SparseFeature(f"{prefix}_id", 40, 4)], dense=[DenseFeature(f"{prefix}_profile", 5)],
                     cross=CrossSpec(kind="full", layers=2), deep=[16], out_dim=8)


def perturb_weights(folder, scale: float) -> None:
    """Add noise to the largest float initializer of every tower's ONNX, as a broken lowering might."""
    for path in folder.glob("*.onnx"):
        model = onnx.load(str(path))
        largest = max((i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT),
                      key=lambda i: np.prod(i.dims))
        weights = numpy_helper.to_array(largest)
        noise = scale * np.random.default_rng(0).standard_normal(weights.shape).astype(np.float32)
        largest.CopyFrom(numpy_helper.from_array(weights + noise, largest.name))
        for leftover in folder.glob(f"{path.name}.data"):
            leftover.unlink()
        onnx.save_model(model, str(path))


def build_verify_case(root: Path) -> Path:
    """model.pt, eval.npz, a faithful bundle and one built from perturbed weights, in `root`."""
    spec = ModelSpec(family="retrieval", towers={"query": tower_spec("user"), "item": tower_spec("item")}, name="tiny")
    spec.validate()
    torch.manual_seed(0)
    model = build_model(spec).eval()
    save_checkpoint(model, spec, root / "model.pt")
    export_model(load_model(str(root / "model.pt")), root / "onnx", validate=False)
    build_bundle(root / "onnx", root / "bundle", batch=(1, 16, 256))
    shutil.copytree(root / "onnx", root / "onnx_fp32")
    perturb_weights(root / "onnx", scale=0.5)
    build_bundle(root / "onnx", root / "broken", batch=(1, 16, 256))
    queries = random_inputs(model.query.input_specs, 30, seed=1)
    items = random_inputs(model.item.input_specs, 200, seed=2)
    rng = np.random.default_rng(3)
    relevance = np.stack([rng.integers(0, 30, 90), rng.integers(0, 200, 90)], axis=1)
    np.savez(root / "eval.npz", relevance=relevance, **{f"query/{k}": v for k, v in queries.items()},
             **{f"item/{k}": v for k, v in items.items()})
    return root
