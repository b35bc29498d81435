"""TensorRT and ONNX Runtime CUDA bundles end to end. These build and run where `tensorrt` / onnxruntime-gpu and an
NVIDIA GPU exist, and skip with the reason elsewhere; what needs neither (refusals, profiles, the inspector's
precision reading) runs everywhere."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnxruntime
import pytest
import torch

from toolkit.backends.bundle import open_bundle
from toolkit.backends.ort.loader import OrtOptions
from toolkit.backends.tensorrt.config import TrtOptions, optimization_profile
from toolkit.backends.tensorrt.loader import layer_precision
from toolkit.backends.torch_runner import TorchRunner
from toolkit.commands.build import build_bundle
from toolkit.core.errors import DcncError
from toolkit.core.signature import random_inputs

HAS_GPU = torch.cuda.is_available()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_ORT_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()

needs_tensorrt = pytest.mark.skipif(not (HAS_TENSORRT and HAS_GPU), reason="needs the tensorrt package and a CUDA GPU")
needs_ort_cuda = pytest.mark.skipif(not (HAS_ORT_CUDA and HAS_GPU), reason="needs onnxruntime-gpu and a CUDA GPU")


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def answers(bundle, tower, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(bundle, torch) embeddings of one tower on the same random rows."""
    feed = random_inputs(tower.input_specs, batch, seed=batch)
    with open_bundle(bundle, tower="query") as runner, TorchRunner(tower) as reference:
        return runner.infer(feed)["embedding"], reference.infer(feed)["embedding"]


# --- everywhere ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_tensorrt_backend_without_the_package_says_how_to_get_it(towers_dir, tmp_path):
    with pytest.raises(DcncError, match="pip install tensorrt"):
        build_bundle(towers_dir, tmp_path / "bundle", backend="tensorrt")
    assert list(tmp_path.iterdir()) == []


def test_profile_ranges_every_input_over_the_batch_and_keeps_the_other_dims():
    inputs = [{"name": "user_id", "shape": ["batch"]}, {"name": "profile", "shape": ["batch", 6]}]
    profile = optimization_profile(inputs, (1, 64, 4096))
    assert [tuple(profile["profile"].min), tuple(profile["profile"].opt), tuple(profile["profile"].max)] == [
        (1, 6), (64, 6), (4096, 6)
    ]  # fmt: skip
    assert tuple(profile["user_id"].max) == (4096,)


def test_profile_refuses_an_input_without_a_leading_dynamic_batch():
    with pytest.raises(DcncError, match="dynamic batch dim first"):
        optimization_profile([{"name": "x", "shape": [8, 6]}], (1, 8, 64))


@pytest.mark.parametrize(
    ("datatype", "precision"),
    [("Half", "fp16"), ("FP32", "fp32"), ("Int8 format", "int8"), ("BFloat16", "bf16"), ("Float", "fp32")],
)
def test_inspector_layer_precision_is_read_from_its_first_output(datatype, precision):
    layer = {"Outputs": [{"Name": "y", "Format/Datatype": f"Row major linear {datatype}"}]}
    assert layer_precision(layer) == precision


def test_trt_options_refuse_out_of_range_values():
    with pytest.raises(DcncError, match="--trt-opt-level 7"):
        TrtOptions(opt_level=7)
    with pytest.raises(DcncError, match="--hardware-compat"):
        TrtOptions(hardware_compat="turing")


# --- TensorRT on a GPU --------------------------------------------------------------------------------------------
@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
@pytest.mark.parametrize("batch", [1, 64])
def test_tensorrt_fp32_engine_answers_like_torch_across_its_profile(towers_dir, two_tower_model, tmp_path, batch):
    manifest = build_bundle(towers_dir / "query.onnx", tmp_path / "bundle", backend="tensorrt", batch=(1, 16, 64))
    entry = manifest.towers["query"]
    assert entry.engine == "query.engine" and entry.engine_info["layers"]
    assert manifest.caches["timing_cache"]["outcome"] == "new"
    got, want = answers(tmp_path / "bundle", two_tower_model.query.cpu(), batch)
    assert cosine_min(got, want) > 0.99999  # TF32 off in the builder: FP32 layers compute in FP32


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
def test_tensorrt_fp16_engine_runs_half_layers_from_the_lowered_graph(towers_dir, two_tower_model, tmp_path):
    manifest = build_bundle(towers_dir / "query.onnx", tmp_path / "bundle", backend="tensorrt", precision="fp16")
    entry = manifest.towers["query"]
    # the lowered graph decides the precision (strongly typed); the inspector cannot see inside fused Myelin
    # layers ("mixed"), so the lowering record and the answers are what is judged
    assert entry.lowering.half_nodes > 0
    assert entry.engine_info["precisions"].get("fp16", 0) + entry.engine_info["precisions"].get("mixed", 0) > 0
    got, want = answers(tmp_path / "bundle", two_tower_model.query.cpu(), 32)
    assert cosine_min(got, want) > 0.999


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
def test_tensorrt_rebuild_reuses_the_timing_cache_and_refuses_batches_outside_the_profile(
    towers_dir, two_tower_model, tmp_path
):
    build_bundle(towers_dir / "query.onnx", tmp_path / "bundle", backend="tensorrt", batch=(1, 8, 16))
    manifest = build_bundle(towers_dir / "query.onnx", tmp_path / "bundle", backend="tensorrt", batch=(1, 8, 16),
                            force=True)  # fmt: skip
    assert manifest.caches["timing_cache"]["outcome"] == "reused"
    too_large = random_inputs(two_tower_model.query.input_specs, 32, seed=0)
    with open_bundle(tmp_path / "bundle", tower="query") as runner, pytest.raises(DcncError, match="batch"):
        runner.infer(too_large)


# --- ONNX Runtime CUDA on a GPU -----------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_ort_cuda
@pytest.mark.parametrize(("precision", "cosine"), [("fp32", 0.99999), ("fp16", 0.999)])
def test_ort_cuda_bundle_runs_on_the_gpu_and_answers_like_torch(towers_dir, two_tower_model, tmp_path, precision,
                                                                 cosine):  # fmt: skip
    build_bundle(towers_dir / "query.onnx", tmp_path / "bundle", backend="ort-cuda", precision=precision)
    with open_bundle(tmp_path / "bundle", tower="query") as runner:
        assert runner.uses_cuda
    got, want = answers(tmp_path / "bundle", two_tower_model.query.cpu(), 64)
    assert cosine_min(got, want) > cosine


def worst_cosine_over_batches(bundle, tower, batches: tuple[int, ...]) -> float:
    """One runner of the bundle's query tower answering batches of these sizes in turn, against torch."""
    worst = 1.0
    with open_bundle(bundle, tower="query") as runner, TorchRunner(tower) as reference:
        for batch in batches:
            feed = random_inputs(tower.input_specs, batch, seed=batch)
            worst = min(worst, cosine_min(runner.infer(feed)["embedding"], reference.infer(feed)["embedding"]))
    return worst


@pytest.mark.gpu
@needs_ort_cuda
def test_ort_cuda_graph_bundle_answers_every_batch_size_like_torch(towers_dir, two_tower_model, tmp_path):
    manifest = build_bundle(towers_dir / "query.onnx", tmp_path / "bundle", backend="ort-cuda", batch=(1, 16, 64),
                            ort_options=OrtOptions(cuda_graph=True))  # fmt: skip
    # captured, or refused by onnxruntime with its reason recorded: either way the bundle says what it runs
    assert manifest.options["ort"]["cuda_graph"] or manifest.options["cuda_graph_refused"]
    # the batch-1 graph replayed after another size was captured
    assert worst_cosine_over_batches(tmp_path / "bundle", two_tower_model.query.cpu(), (1, 64, 1)) > 0.99999


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
def test_tensorrt_cuda_graphs_answer_every_batch_size_like_torch(towers_dir, two_tower_model, tmp_path):
    build_bundle(towers_dir / "query.onnx", tmp_path / "bundle", backend="tensorrt", batch=(1, 16, 64),
                 trt_options=TrtOptions(cuda_graph=True))  # fmt: skip
    assert worst_cosine_over_batches(tmp_path / "bundle", two_tower_model.query.cpu(), (1, 64, 1)) > 0.99999
