"""`dcnc package --triton` writes one Triton model per tower whose config.pbtxt parses as Triton's own ModelConfig
and matches the bundle (batch profile, tensors, device, verified settings), and refuses bad input in one line,
writing nothing."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import numpy as np
import onnxruntime
import pytest
from google.protobuf import text_format
from typer.testing import CliRunner

from cli import app
from toolkit.backends.bundle import (
    Manifest,
    TowerEntry,
    load_manifest,
    open_bundle,
    write_manifest,
)
from toolkit.commands.build import build_bundle
from toolkit.commands.package import model_config, package_triton
from toolkit.core.errors import DcncError

BATCH = (1, 8, 64)
TOWER_INPUTS = [
    {"name": "user_id", "dtype": "int64", "shape": ["batch"]},
    {"name": "profile", "dtype": "float32", "shape": ["batch", 6]},
]
TOWER_OUTPUTS = [{"name": "embedding", "dtype": "float32", "shape": ["batch", 8]}]


@pytest.fixture(scope="module")
def model_config_pb2():
    """Triton's ModelConfig message from tritonclient's generated module, loaded by file: importing it through
    tritonclient.grpc needs grpcio, and tritonclient[grpc] pins a protobuf older than the one onnx uses."""
    if "triton_model_config_pb2" in sys.modules:
        return sys.modules["triton_model_config_pb2"]
    found = importlib.util.find_spec("tritonclient")
    if found is None:
        pytest.skip("tritonclient is not installed (it comes with the test extra: pip install -e '.[test]')")
    path = f"{found.submodule_search_locations[0]}/grpc/model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["triton_model_config_pb2"] = module
    return module


@pytest.fixture
def parse(model_config_pb2):
    """config.pbtxt text (or its path) -> inference.ModelConfig; text_format refuses any field Triton lacks."""

    def parse_config(config):
        text = config.read_text() if hasattr(config, "read_text") else config
        return text_format.Parse(text, model_config_pb2.ModelConfig())

    return parse_config


@pytest.fixture(scope="module")
def bundle(towers_dir, tmp_path_factory):
    """A two-tower ORT fp32 bundle named `tiny`, built with ORT's extended graph optimisation and 3 threads."""
    from toolkit.backends.ort.loader import OrtOptions

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    build_bundle(towers_dir, out, batch=BATCH, ort_options=OrtOptions(opt_level="extended", threads=3))
    return out


@pytest.fixture(scope="module")
def repo(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "models"
    package_triton(bundle, out)
    return out


def manifest_for(backend: str, options: dict | None = None, batch=BATCH, inputs=None) -> Manifest:
    """A manifest as `dcnc build` writes it for `backend`, for configs of bundles that cannot be built here."""
    key = "tensorrt" if backend == "tensorrt" else "ort"
    defaults = {
        "ort": {"threads": None, "opt_level": "all", "device_id": 0, "cuda_graph": False},
        "tensorrt": {"opt_level": 3, "version_compatible": False, "cuda_graph": False, "device_id": 0},
    }
    return Manifest(
        backend=backend,
        precision="fp16",
        batch=dict(zip(("min", "opt", "max"), batch, strict=True)),
        versions={"tensorrt": "10.9.0" if backend == "tensorrt" else None},
        device={"kind": "cuda", "compute_capability": "9.0"},
        options={key: {**defaults[key], **(options or {})}},
        inputs={},
        towers={
            "query": TowerEntry(
                onnx="query.onnx", inputs=inputs or TOWER_INPUTS, outputs=TOWER_OUTPUTS, source_sha256="0",
                engine="query.engine" if backend == "tensorrt" else None,
            )
        },
    )


def handmade_bundle(folder, towers_dir, manifest: Manifest):
    """A bundle directory for `manifest` from the exported query tower (its weights in query.onnx.data) and, for
    TensorRT, stand-in engine bytes: the packager copies engines, it never runs them."""
    folder.mkdir()
    for name in ("query.onnx", "query.onnx.data"):
        shutil.copyfile(towers_dir / name, folder / name)
    if manifest.backend == "tensorrt":
        (folder / "query.engine").write_bytes(b"serialized TensorRT plan")
    write_manifest(folder, manifest, {})
    return folder


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- what is written ------------------------------------------------------------------------------------------
def test_every_tower_becomes_a_model_named_for_bundle_and_tower_with_its_onnx(bundle, repo):
    assert leftovers(repo) == ["tiny_item", "tiny_query"]
    for tower in ("item", "query"):
        model = repo / f"tiny_{tower}"
        assert leftovers(model) == ["1", "config.pbtxt"]
        assert (model / "1" / "model.onnx").read_bytes() == (bundle / f"{tower}.onnx").read_bytes()


def test_config_parses_as_tritons_model_config_with_the_bundles_profile_and_tensors(repo, parse, model_config_pb2):
    config = parse(repo / "tiny_query" / "config.pbtxt")
    assert config.name == "tiny_query"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 64
    inputs = {i.name: i for i in config.input}
    assert (inputs["profile"].data_type, list(inputs["profile"].dims)) == (model_config_pb2.TYPE_FP32, [6])
    # one id per row: declared [1] per request, reshaped to the graph's rank-1 [batch]
    assert (inputs["user_id"].data_type, list(inputs["user_id"].dims)) == (model_config_pb2.TYPE_INT64, [1])
    assert inputs["user_id"].HasField("reshape")
    assert list(inputs["user_id"].reshape.shape) == []
    (output,) = config.output
    assert (output.name, output.data_type, list(output.dims)) == ("embedding", model_config_pb2.TYPE_FP32, [8])


def test_dynamic_batching_prefers_the_profiles_opt_batch(repo, parse):
    batching = parse(repo / "tiny_item" / "config.pbtxt").dynamic_batching
    assert list(batching.preferred_batch_size) == [8]
    assert batching.max_queue_delay_microseconds == 100


def test_ort_bundle_runs_on_cpu_instances_with_its_verified_session_settings(repo, parse):
    config = parse(repo / "tiny_query" / "config.pbtxt")
    (group,) = config.instance_group
    assert (group.count, group.kind) == (1, group.KIND_CPU)
    assert config.optimization.graph.level == 1  # Triton's number for ORT_ENABLE_EXTENDED
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params == {"execution_mode": "0", "intra_op_thread_count": "3"}


@pytest.mark.parametrize(("opt_level", "level"), [("disable", 2), ("basic", -1), ("extended", 1)])
def test_graph_level_follows_the_ort_opt_level_in_tritons_numbering(parse, opt_level, level):
    config = parse(model_config(manifest_for("ort", {"opt_level": opt_level}), "query", "m"))
    assert config.optimization.graph.level == level


def test_full_ort_optimisation_leaves_tritons_default_which_is_all(parse):
    config = parse(model_config(manifest_for("ort"), "query", "m"))
    assert not config.optimization.HasField("graph")
    assert config.parameters["intra_op_thread_count"].string_value == "0"  # ORT picks the server's cores


def test_packaged_onnx_accepts_requests_shaped_as_the_config_declares(bundle, repo, parse):
    """What Triton would feed (batch + dims, then reshape) runs in ORT and gives the bundle's answer."""
    config = parse(repo / "tiny_query" / "config.pbtxt")
    rng = np.random.default_rng(0)
    batch = 5
    feed = {}
    for tensor in config.input:
        shape = [batch, *tensor.dims]
        if tensor.HasField("reshape"):
            shape = [batch, *tensor.reshape.shape]
        feed[tensor.name] = (
            rng.integers(0, 50, shape) if tensor.name == "user_id" else rng.standard_normal(shape).astype(np.float32)
        )
    model = repo / "tiny_query" / "1" / "model.onnx"
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (got,) = session.run(["embedding"], feed)
    assert list(got.shape) == [batch, *config.output[0].dims]
    runner = open_bundle(bundle, tower="query")
    with runner:
        want = runner.infer(feed)["embedding"]
    assert np.abs(got - want).max() < 1e-6


def test_external_weights_travel_beside_model_onnx(towers_dir, tmp_path):
    source = handmade_bundle(tmp_path / "exported_bundle", towers_dir, manifest_for("ort"))
    package_triton(source, tmp_path / "models")
    version = tmp_path / "models" / "exported_bundle_query" / "1"
    assert leftovers(version) == ["model.onnx", "query.onnx.data"]
    session = onnxruntime.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["user_id", "profile"]


def test_name_prefix_instances_and_queue_delay_are_applied(bundle, tmp_path, parse):
    package_triton(bundle, tmp_path / "models", name_prefix="recsys", instances=3, max_queue_delay_us=2500)
    assert leftovers(tmp_path / "models") == ["recsys_item", "recsys_query"]
    config = parse(tmp_path / "models" / "recsys_item" / "config.pbtxt")
    assert config.name == "recsys_item"
    assert config.instance_group[0].count == 3
    assert config.dynamic_batching.max_queue_delay_microseconds == 2500


def test_other_models_in_the_repository_are_kept(bundle, tmp_path):
    (tmp_path / "models" / "ranker").mkdir(parents=True)
    package_triton(bundle, tmp_path / "models")
    assert leftovers(tmp_path / "models") == ["ranker", "tiny_item", "tiny_query"]


def test_force_replaces_an_existing_model(bundle, tmp_path):
    stale = tmp_path / "models" / "tiny_query"
    stale.mkdir(parents=True)
    (stale / "old.txt").write_text("stale")
    package_triton(bundle, tmp_path / "models", force=True)
    assert leftovers(stale) == ["1", "config.pbtxt"]
    assert leftovers(tmp_path / "models") == ["tiny_item", "tiny_query"]  # no staging directories left behind


# --- GPU bundles ----------------------------------------------------------------------------------------------
def test_ort_cuda_bundle_is_an_onnx_model_on_gpu_instances(parse):
    config = parse(model_config(manifest_for("ort-cuda"), "query", "m"))
    assert config.platform == "onnxruntime_onnx"
    assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU


def test_ort_cuda_graphs_are_not_carried_to_triton(parse):
    """dcnc replays one graph per batch size by gpu_graph_id; Triton's ORT backend cannot, so nothing enables them."""
    text = model_config(manifest_for("ort-cuda", {"cuda_graph": True}), "query", "m")
    config = parse(text)
    assert "enable_cuda_graph" not in text and not config.optimization.HasField("cuda")
    assert "CUDA graphs are not carried over" in text


def test_tensorrt_bundle_becomes_a_plan_model_on_gpu_with_its_engine(towers_dir, tmp_path, parse):
    manifest = manifest_for("tensorrt", {"cuda_graph": True}, batch=(1, 128, 2048))
    source = handmade_bundle(tmp_path / "ranker", towers_dir, manifest)
    package_triton(source, tmp_path / "models")
    model = tmp_path / "models" / "ranker_query"
    assert leftovers(model / "1") == ["model.plan"]
    assert (model / "1" / "model.plan").read_bytes() == b"serialized TensorRT plan"
    config = parse(model / "config.pbtxt")
    assert config.platform == "tensorrt_plan"
    assert config.max_batch_size == 2048
    assert list(config.dynamic_batching.preferred_batch_size) == [128]
    assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
    assert config.optimization.cuda.graphs is True
    assert "TensorRT 10.9.0 for compute capability 9.0" in (model / "config.pbtxt").read_text()


def test_version_compatible_engine_config_says_how_to_start_the_server(parse):
    text = model_config(manifest_for("tensorrt", {"version_compatible": True}), "query", "m")
    parse(text)
    assert "--backend-config=tensorrt,version-compatible=true" in text


def test_tensorrt_profile_not_starting_at_batch_one_is_refused(parse):
    with pytest.raises(DcncError, match=r"TensorRT engines take batches from 4, .* rebuild with --batch 1:8:64"):
        model_config(manifest_for("tensorrt", batch=(4, 8, 64)), "query", "m")


# --- refusals: one line, nothing written ----------------------------------------------------------------------
def test_directory_that_is_not_a_bundle_is_refused(tmp_path):
    (tmp_path / "towers").mkdir()
    with pytest.raises(DcncError, match="not a dcnc bundle"):
        package_triton(tmp_path / "towers", tmp_path / "models")
    assert not (tmp_path / "models").exists()


def test_changed_bundle_is_refused(bundle, tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(bundle, copy)
    with open(copy / "item.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DcncError, match="item.onnx does not match the hash in its manifest"):
        package_triton(copy, tmp_path / "models")
    assert not (tmp_path / "models").exists()


def test_existing_model_is_refused_without_force_and_no_tower_is_written(bundle, tmp_path):
    (tmp_path / "models" / "tiny_query").mkdir(parents=True)
    with pytest.raises(DcncError, match="tiny_query: already exists"):
        package_triton(bundle, tmp_path / "models")
    assert leftovers(tmp_path / "models") == ["tiny_query"]
    assert leftovers(tmp_path / "models" / "tiny_query") == []


def test_repository_under_a_file_is_unwritable(bundle, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DcncError, match="cannot be created: .*file is not a folder"):
        package_triton(bundle, tmp_path / "file" / "models")


def test_repository_that_is_a_file_is_refused(bundle, tmp_path):
    (tmp_path / "models").write_text("")
    with pytest.raises(DcncError, match="exists and is not a folder"):
        package_triton(bundle, tmp_path / "models")


def test_repository_inside_the_bundle_is_refused(bundle, tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(bundle, copy)
    with pytest.raises(DcncError, match="lies inside the input folder"):
        package_triton(copy, copy / "models")
    assert not (copy / "models").exists()


def test_tower_input_without_a_batch_axis_is_refused_before_anything_is_written(bundle, tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(bundle, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["towers"]["query"]["inputs"][1]["shape"] = [1, 6]  # exported with a fixed batch of 1
    (copy / "manifest.json").write_text(json.dumps(data))
    message = r"tower query input profile has shape \[1, 6\], without a leading dynamic batch axis"
    with pytest.raises(DcncError, match=message):
        package_triton(copy, tmp_path / "models")
    assert not (tmp_path / "models").exists()


def test_dtype_triton_lacks_is_refused():
    inputs = [{"name": "x", "dtype": "complex64", "shape": ["batch", 4]}]
    with pytest.raises(DcncError, match="tower query input x has dtype complex64, which Triton has no type for"):
        model_config(manifest_for("ort", inputs=inputs), "query", "m")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name_prefix": "my model"}, "model name 'my model_item': use letters, digits"),
        ({"instances": 0}, "--instances 0: must be at least 1"),
        ({"max_queue_delay_us": -1}, "--max-queue-delay-us -1: must be 0 or more"),
    ],
)
def test_bad_options_are_refused(bundle, tmp_path, kwargs, message):
    with pytest.raises(DcncError, match=message):
        package_triton(bundle, tmp_path / "models", **kwargs)
    assert not (tmp_path / "models").exists()


def test_failure_while_copying_leaves_the_repository_as_it_was(bundle, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    calls, real_copyfile = [], shutil.copyfile

    def copy_then_fail(source, target):
        calls.append(source)
        if len(calls) == 2:  # the first tower is staged, the second fails (disk full)
            raise OSError(28, "No space left on device")
        return real_copyfile(source, target)

    monkeypatch.setattr("toolkit.commands.package.shutil.copyfile", copy_then_fail)
    with pytest.raises(DcncError, match="tiny_query: not written \\(No space left on device\\)"):
        package_triton(bundle, tmp_path / "models")
    assert leftovers(tmp_path / "models") == []


# --- the command ----------------------------------------------------------------------------------------------
def test_package_command_writes_the_repository_and_names_each_model(bundle, tmp_path):
    result = CliRunner().invoke(app, ["package", str(bundle), "--triton", str(tmp_path / "models")])
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'models'}/tiny_query: onnxruntime_onnx, tower query" in result.output
    assert load_manifest(bundle)  # the bundle itself is untouched


def test_package_command_refusal_is_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["package", str(tmp_path / "missing"), "--triton", str(tmp_path / "models")])
    assert result.exit_code == 2
    assert "bundle not found" in result.output and len(result.output.strip().splitlines()) == 1


def test_package_help_names_the_options_and_why_there_is_no_ensemble():
    result = CliRunner().invoke(app, ["package", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--triton", "--name-prefix", "--instances", "--max-queue-delay-us", "--force"):
        assert option in result.output
    assert "No ensemble" in result.output
