"""Runners share one interface (activate / infer / deactivate / input metadata / last_inference_time), check their
feeds in one line, and plug into polygraphy's Comparator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toolkit.backends.bundle import open_bundle
from toolkit.backends.ort.loader import OrtOptions, session_options
from toolkit.backends.ort.runner import ort_runner
from toolkit.backends.torch_runner import TorchRunner, torch_runners
from toolkit.commands.build import build_bundle
from toolkit.core.errors import DcncError
from toolkit.core.machine import usable_cores
from toolkit.core.signature import random_inputs


@pytest.fixture(scope="module")
def query_bundle(towers_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runners") / "query"
    build_bundle(towers_dir / "query.onnx", out, batch=(2, 8, 16))
    return out


@pytest.fixture
def query_feed(two_tower_model):
    return random_inputs(two_tower_model.query.input_specs, 8, seed=5)


def test_ort_runner_on_the_exported_graph_matches_torch(towers_dir, two_tower_model, query_feed):
    with ort_runner(towers_dir / "query.onnx") as ort, TorchRunner(two_tower_model.query) as reference:
        got, want = ort.infer(query_feed), reference.infer(query_feed)
    assert list(got) == ["embedding"]
    assert np.abs(got["embedding"] - want["embedding"]).max() < 1e-5


def test_torch_runner_returns_every_named_output_as_numpy():
    from toolkit.model.spec import DenseFeature, ModelSpec, TowerSpec
    from toolkit.model.zoo.families import Ranker

    ranker = Ranker(ModelSpec("ranking", {"ranker": TowerSpec(dense=[DenseFeature("d", 3)], deep=[4])}))
    with TorchRunner(ranker) as runner:
        outputs = runner.infer(random_inputs(ranker.input_specs, 5))
    assert list(outputs) == ["logit", "probability"]
    assert np.allclose(outputs["probability"], 1 / (1 + np.exp(-outputs["logit"])), atol=1e-6)


def test_torch_runners_from_a_checkpoint_are_named_per_tower(two_tower_model, two_tower_spec, tmp_path):
    from toolkit.model.checkpoint import save_checkpoint

    save_checkpoint(two_tower_model, two_tower_spec, tmp_path / "m.pt")
    runners = torch_runners(tmp_path / "m.pt")
    assert {n: r.name for n, r in runners.items()} == {"query": "torch:query", "item": "torch:item"}


def test_input_metadata_keeps_the_dynamic_batch_by_name(query_bundle):
    with open_bundle(query_bundle, tower="query") as runner:
        metadata = runner.get_input_metadata()
    assert {n: (m.dtype.name, m.shape) for n, m in metadata.items()} == {
        "user_id": ("int64", ("batch",)),
        "profile": ("float32", ("batch", 6)),
    }


def test_last_inference_time_is_the_seconds_of_the_last_call(query_bundle, query_feed):
    with open_bundle(query_bundle, tower="query") as runner:
        assert runner.last_inference_time() is None
        runner.infer(query_feed)
        assert 0 < runner.last_inference_time() < 10


def test_batch_outside_the_profile_is_refused(query_bundle, two_tower_model):
    feed = random_inputs(two_tower_model.query.input_specs, 17)
    with open_bundle(query_bundle, tower="query") as runner, pytest.raises(
        DcncError, match="batch 17 is outside the batch profile 2..16"
    ):
        runner.infer(feed)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.update(profile=f["profile"].astype(np.float64)), "input profile is float64, the model expects float32"),
        (lambda f: f.update(profile=f["profile"][:, :5]), r"input profile has shape \(8, 5\), the model expects \('batch', 6\)"),
        (lambda f: f.pop("user_id"), r"missing \['user_id'\]"),
        (lambda f: f.update(extra=f["profile"]), r"unexpected \['extra'\]"),
    ],
)
def test_wrong_feed_is_refused_naming_the_input(query_bundle, query_feed, change, message):
    change(query_feed)
    with open_bundle(query_bundle, tower="query") as runner, pytest.raises(DcncError, match=message):
        runner.infer(query_feed)


def test_infer_before_activate_is_refused(query_bundle, query_feed):
    runner = open_bundle(query_bundle, tower="query")
    with pytest.raises(DcncError, match="call activate\\(\\)"):
        runner.infer(query_feed)


def test_deactivate_releases_the_session(query_bundle):
    runner = open_bundle(query_bundle, tower="query")
    with runner:
        assert runner.session is not None
    assert runner.session is None and not runner.is_active


def test_cpu_sessions_use_the_sequential_executor_on_every_usable_core():
    import onnxruntime as ort

    options = session_options(OrtOptions())
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.intra_op_num_threads == usable_cores()
    assert session_options(OrtOptions(threads=1)).intra_op_num_threads == 1


def test_polygraphy_comparator_compares_a_bundle_runner_with_torch(query_bundle, two_tower_model):
    comparator = pytest.importorskip("polygraphy.comparator")
    runners = [open_bundle(query_bundle, tower="query"), TorchRunner(two_tower_model.query)]
    loader = comparator.DataLoader(iterations=2, val_range=(0, 1))
    results = comparator.Comparator.run(runners, data_loader=loader)
    assert bool(comparator.Comparator.compare_accuracy(results))
    assert len(results[0][1]) == 2  # both iterations ran through the bundle's runner


def test_a_runner_on_another_device_leaves_a_shared_module_where_it_is(two_tower_model, query_feed):
    tower = two_tower_model.query
    with TorchRunner(tower) as cpu:
        before = cpu.infer(query_feed)["embedding"]
        with TorchRunner(tower, "meta") as elsewhere:  # a device torch has everywhere, standing in for cuda
            assert next(elsewhere.module.parameters()).device.type == "meta"
            assert all(p.device.type == "cpu" for p in tower.parameters())
            assert np.array_equal(cpu.infer(query_feed)["embedding"], before)


class TF32Probe(torch.nn.Module):
    """A tower that records whether float32 matmuls on CUDA would have used TF32 while it ran."""

    input_specs = ()
    output_names = ("seen",)

    def forward(self):
        self.seen = torch.backends.cuda.matmul.fp32_precision
        return torch.zeros(1)


def test_the_torch_reference_computes_without_tf32_and_restores_the_callers_setting():
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = "tf32"  # e.g. torch.set_float32_matmul_precision("high") somewhere in the process
    try:
        probe = TF32Probe()
        with TorchRunner(probe) as runner:
            runner.infer({})
        assert probe.seen == "ieee"
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = saved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device visible to torch")
def test_torch_runner_on_cuda_matches_cpu(two_tower_model, query_feed):
    with TorchRunner(two_tower_model.query, "cuda") as gpu, TorchRunner(two_tower_model.query) as cpu:
        assert np.abs(gpu.infer(query_feed)["embedding"] - cpu.infer(query_feed)["embedding"]).max() < 1e-4


def test_torch_runner_on_cuda_without_a_gpu_says_so(two_tower_model):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(DcncError, match="torch sees no CUDA device"):
        TorchRunner(two_tower_model.query, "cuda").activate()
