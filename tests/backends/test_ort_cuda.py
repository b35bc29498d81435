"""ONNX Runtime on CUDA, checked against a fake onnxruntime-gpu that records what dcnc asks of it: TF32 off
unless allowed, CUDA-graph refusals recognised and recorded, one CUDA graph per timed batch size."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_fakes import CUDA, FakeCudaSession, fake_onnxruntime, feed

from toolkit.backends.ort.loader import (
    CudaGraphRefused,
    OrtOptions,
    ort_session,
    providers,
)
from toolkit.backends.ort.runner import OrtRunner
from toolkit.backends.timing import device_call
from toolkit.commands.build import build_bundle
from toolkit.core.errors import DcncError


def cuda_options(options: OrtOptions) -> dict:
    (name, given), _ = providers("ort-cuda", options)
    assert name == CUDA
    return given


def test_cuda_provider_computes_fp32_without_tf32_unless_allowed():
    # the CUDA provider's own default (use_tf32 in cuda_execution_provider_info.h) is on
    assert cuda_options(OrtOptions())["use_tf32"] == "0"
    assert cuda_options(OrtOptions(allow_tf32=True))["use_tf32"] == "1"


def test_an_ort_cuda_bundle_records_whether_tf32_was_allowed(towers_dir, tmp_path, monkeypatch):
    ort = fake_onnxruntime(monkeypatch)
    manifest = build_bundle(towers_dir / "query.onnx", tmp_path / "b", backend="ort-cuda",
                            ort_options=OrtOptions(allow_tf32=True))  # fmt: skip
    assert manifest.options["ort"]["allow_tf32"] is True
    assert ort.sessions[-1]["providers"][0][1]["use_tf32"] == "1"


def test_ort_refusing_cuda_graph_capture_is_recognised(monkeypatch, tmp_path):
    fake_onnxruntime(monkeypatch, refuse_cuda_graph=True)
    with pytest.raises(CudaGraphRefused, match="not been partitioned to the CUDAExecutionProvider"):
        ort_session(b"graph", "ort-cuda", OrtOptions(cuda_graph=True))


def test_a_cuda_graph_build_records_the_setting_it_runs_with_when_ort_refuses_capture(towers_dir, tmp_path,
                                                                                       monkeypatch):  # fmt: skip
    ort = fake_onnxruntime(monkeypatch, refuse_cuda_graph=True)
    manifest = build_bundle(towers_dir / "query.onnx", tmp_path / "b", backend="ort-cuda",
                            ort_options=OrtOptions(cuda_graph=True))  # fmt: skip
    assert manifest.options["ort"]["cuda_graph"] is False
    assert "not been partitioned" in manifest.options["cuda_graph_refused"]
    assert ort.sessions[-1]["providers"][0][1]["enable_cuda_graph"] == "0"


def test_a_session_falling_back_to_the_cpu_is_refused_for_ort_cuda(monkeypatch):
    ort = fake_onnxruntime(monkeypatch)
    ort.InferenceSession = lambda *args, **kwargs: FakeCudaSession(fallback=True)
    with pytest.raises(DcncError, match="found no usable CUDA device"):
        ort_session(b"graph", "ort-cuda")


@pytest.fixture
def graph_runner(monkeypatch):
    fake_onnxruntime(monkeypatch)
    session = FakeCudaSession({"device_id": "0", "enable_cuda_graph": "1", "use_tf32": "0"})
    runner = OrtRunner(session, name="ort-cuda:query")
    runner.activate()
    return runner, session


def test_timed_calls_replay_one_cuda_graph_per_batch_size(graph_runner):
    runner, session = graph_runner
    # as verify's latency sweep does: every size's call made first, then timed in turn
    calls = {batch: device_call(runner, feed(batch), "cuda") for batch in (1, 64, 256)}
    for batch in (1, 64, 256, 1):
        calls[batch]()
        run = session.runs[-1]
        assert run["batch"] == batch and run["output"].array.shape == (batch, 2)
    graph_ids = {run["batch"]: run["gpu_graph_id"] for run in session.runs}
    assert None not in graph_ids.values() and len(set(graph_ids.values())) == 3


def test_cuda_graph_infer_answers_each_batch_from_its_own_buffers(graph_runner):
    runner, session = graph_runner
    first = runner.infer(feed(2))["y"].copy()
    runner.infer(feed(3))
    again = runner.infer(feed(2))["y"]
    assert np.array_equal(first, again) and np.array_equal(first[:, 0], feed(2)["x"].sum(axis=1))
    assert [r["gpu_graph_id"] for r in session.runs] == ["1", "2", "1"]


def test_timed_calls_without_cuda_graphs_bind_inputs_on_the_device_once(monkeypatch):
    fake_onnxruntime(monkeypatch)
    session = FakeCudaSession()
    runner = OrtRunner(session)
    runner.activate()
    call = device_call(runner, feed(8), "cuda")
    call()
    call()
    assert [(r["batch"], r["gpu_graph_id"]) for r in session.runs] == [(8, None), (8, None)]
