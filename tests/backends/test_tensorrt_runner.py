"""The TensorRT runner and inspector, checked against fake engines and execution contexts that record the calls
made to them: each timed batch size and each CUDA graph has an execution context of its own, Myelin layers
count as mixed precision, TF32 stays off in the builder unless allowed."""

from __future__ import annotations

import pytest
from gpu_fakes import FakeEngine, HostTrtRunner, fake_tensorrt, feed

from toolkit.backends.tensorrt.config import (
    TrtOptions,
    create_config,
    optimization_profile,
)
from toolkit.backends.tensorrt.loader import inspect_engine, layer_precision
from toolkit.backends.timing import device_call


@pytest.fixture
def engine(monkeypatch):
    fake_tensorrt(monkeypatch)
    return FakeEngine()


def test_each_timed_batch_size_runs_at_its_own_shape(engine):
    with HostTrtRunner(engine, cuda_graph=False) as runner:
        # as verify's latency sweep does: every size's call made first, then timed in turn
        calls = {batch: device_call(runner, feed(batch), "cuda") for batch in (1, 64, 256)}
        for batch in (1, 64, 256, 1):
            calls[batch]()
            assert engine.executions[-1]["shapes"]["x"] == (batch, 4)


def test_cuda_graphs_are_captured_one_execution_context_per_shape(engine):
    with HostTrtRunner(engine, cuda_graph=True) as runner:
        runner.infer(feed(1))
        runner.infer(feed(64))
        replay_of_1 = len(engine.executions)
        runner.infer(feed(1))
    executed = engine.executions[replay_of_1]
    assert executed["shapes"]["x"] == (1, 4)  # not the 64 set on another context since
    contexts = {id(e["context"]) for e in engine.executions}
    assert len(contexts) == 2
    for context in engine.contexts:
        assert len({shape for _, shape in context.shape_calls}) <= 1  # no context ever changes shape


def test_cuda_graph_answers_come_from_the_batch_own_buffers(engine):
    with HostTrtRunner(engine, cuda_graph=True) as runner:
        first = runner.infer(feed(3))["y"]
        runner.infer(feed(5))
        assert runner.infer(feed(3))["y"].shape == first.shape == (3, 2)


def test_infer_without_graphs_rebinds_its_context_at_every_call(engine):
    with HostTrtRunner(engine) as runner:
        for batch in (2, 7, 2):
            assert runner.infer(feed(batch))["y"].shape == (batch, 2)
            assert engine.executions[-1]["shapes"]["x"] == (batch, 4)


@pytest.mark.parametrize(
    ("layer", "precision"),
    [
        ({"Name": "{ForeignNode[/cross/Gemm.../head/Cast]}", "LayerType": "Myelin",
          "Outputs": [{"Name": "out", "Format/Datatype": "Row major linear FP32"}]}, "mixed"),
        ({"Name": "{ForeignNode[/deep/MatMul]}", "Outputs": [{"Format/Datatype": "Half"}]}, "mixed"),
        ({"Name": "/deep/MatMul", "LayerType": "CaskGemm", "Outputs": [{"Format/Datatype": "Half"}]}, "fp16"),
    ],
)  # fmt: skip
def test_fused_myelin_layers_count_as_mixed_not_as_their_first_output(layer, precision):
    assert layer_precision(layer) == precision


def test_inspector_summary_counts_fused_subgraphs_apart(monkeypatch):
    fake_tensorrt(monkeypatch)
    layers = [
        {"Name": "{ForeignNode[/cross/Gemm.../head/Cast]}", "LayerType": "Myelin", "TacticName": "myelin",
         "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
        {"Name": "/embed/Gather", "LayerType": "Gather", "Outputs": [{"Format/Datatype": "Row major linear FP16"}]},
    ]  # fmt: skip
    summary = inspect_engine(FakeEngine(layers))
    assert summary["precisions"] == {"mixed": 1, "fp16": 1}
    assert summary["layers"][0]["tactic"] == "myelin" and summary["aux_streams"] == 1


@pytest.mark.parametrize("allow", [False, True])
def test_builder_config_keeps_tf32_off_unless_allowed(monkeypatch, allow):
    # TensorRT's builder turns TF32 on by default; polygraphy's CreateConfig clears it unless tf32=True
    fake_tensorrt(monkeypatch)
    profile = optimization_profile([{"name": "x", "shape": ["batch", 4]}], (1, 8, 64))
    assert create_config(TrtOptions(allow_tf32=allow), profile, None).tf32 is allow
    assert TrtOptions(allow_tf32=allow).to_dict()["allow_tf32"] is allow
