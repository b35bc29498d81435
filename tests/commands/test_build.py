"""`dcnc build` writes ORT bundles that run with the original's answers, and refuses bad input in one line, leaving
nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from typer.testing import CliRunner

from cli import app
from toolkit.backends.bundle import open_bundle
from toolkit.backends.torch_runner import TorchRunner
from toolkit.commands.build import build_bundle, parse_batch
from toolkit.core.errors import DcncError
from toolkit.core.fileio import sha256_file
from toolkit.core.signature import random_inputs


def leftovers(folder):
    """Everything in `folder` (temporary build directories start with a dot)."""
    return sorted(p.name for p in folder.iterdir())


def test_directory_of_towers_builds_one_bundle_whose_towers_match_torch(towers_dir, two_tower_model, tmp_path):
    manifest = build_bundle(towers_dir, tmp_path / "bundle", batch=(1, 8, 64))
    assert sorted(manifest.towers) == ["item", "query"]
    for name, runner in open_bundle(tmp_path / "bundle").items():
        tower = two_tower_model.towers()[name]
        feed = random_inputs(tower.input_specs, 32, seed=3)
        with runner, TorchRunner(tower) as reference:
            got, want = runner.infer(feed)["embedding"], reference.infer(feed)["embedding"]
        assert np.abs(got - want).max() < 1e-5


def test_single_onnx_file_is_one_tower_named_by_its_stem(towers_dir, tmp_path):
    manifest = build_bundle(towers_dir / "query.onnx", tmp_path / "bundle")
    assert list(manifest.towers) == ["query"]


def test_manifest_records_versions_device_profile_hashes_and_options(towers_dir, tmp_path):
    build_bundle(towers_dir, tmp_path / "bundle", batch=(2, 16, 128))
    data = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert data["schema"] == "dcnc.bundle/1"
    assert data["versions"]["onnxruntime"] == onnxruntime.__version__
    assert data["versions"]["onnx"] and data["versions"]["torch"] and data["versions"]["dcnc"]
    assert data["device"]["kind"] == "cpu" and data["device"]["cores"] >= 1
    assert data["batch"] == {"min": 2, "opt": 16, "max": 128}
    assert data["options"]["ort"] == {"threads": None, "opt_level": "all", "device_id": 0, "cuda_graph": False,
                                      "allow_tf32": False}
    assert data["precision"] == "fp32" and data["backend"] == "ort"
    assert data["towers"]["query"]["inputs"][1] == {"name": "profile", "dtype": "float32", "shape": ["batch", 6]}
    for rel, record in data["files"].items():
        assert record["sha256"] == sha256_file(tmp_path / "bundle" / rel)


def test_source_hash_covers_the_external_weights(towers_dir, tmp_path):
    copy = tmp_path / "exported"
    shutil.copytree(towers_dir, copy)
    before = build_bundle(copy / "query.onnx", tmp_path / "a").inputs["model"]["sha256"]["query"]
    weights = copy / "query.onnx.data"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    after = build_bundle(copy / "query.onnx", tmp_path / "b").inputs["model"]["sha256"]["query"]
    assert before != after


def test_saved_optimized_graph_is_marked_non_portable_and_is_what_runs(towers_dir, two_tower_model, tmp_path):
    manifest = build_bundle(towers_dir / "item.onnx", tmp_path / "bundle", save_optimized=True)
    entry = manifest.towers["item"]
    assert manifest.files[entry.optimized_onnx]["portable"] is False
    assert manifest.files[entry.onnx]["portable"] is True
    runner = open_bundle(tmp_path / "bundle", tower="item")
    feed = random_inputs(two_tower_model.item.input_specs, 4, seed=0)
    with runner, TorchRunner(two_tower_model.item) as reference:
        assert np.abs(runner.infer(feed)["embedding"] - reference.infer(feed)["embedding"]).max() < 1e-5
        assert Path(runner._session.model).name == "item.ort-optimized.onnx"


def test_existing_output_is_refused_without_force_and_left_untouched(towers_dir, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DcncError, match="already exists"):
        build_bundle(towers_dir, out)
    assert leftovers(out) == ["keep.txt"]


def test_force_rebuilds_an_existing_bundle(towers_dir, tmp_path):
    build_bundle(towers_dir / "query.onnx", tmp_path / "bundle")
    manifest = build_bundle(towers_dir, tmp_path / "bundle", force=True)
    assert sorted(manifest.towers) == ["item", "query"]
    assert leftovers(tmp_path) == ["bundle"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "onnx"}, "--backend 'onnx': choose one of ort, ort-cuda, tensorrt"),
        ({"precision": "fp8"}, "--precision 'fp8': choose one of fp32, fp16, bf16, int8"),
        ({"precision": "int8"}, "int8 needs calibration data"),
        ({"precision": "fp32", "calib": "calib.npz"}, "--calib is used by --precision fp16, bf16 and int8, not fp32"),
        ({"precision": "bf16"}, "--precision bf16 needs a GPU backend"),
        ({"precision": "fp16", "int8_target": "tensorrt"}, "--int8-target applies to --precision int8 only"),
        ({"precision": "fp16", "calib_method": "entropy"}, "--calib-method, --keep-fp32, --int8-isa and --min-agreement apply to --precision int8"),
        ({"precision": "fp16", "min_agreement": 0.9}, "--int8-isa and --min-agreement apply to --precision int8"),
        ({"precision": "int8", "calib": "calib.npz", "int8_isa": "sse"}, "--int8-isa 'sse': choose one of"),
        ({"precision": "int8", "calib": "calib.npz", "min_agreement": 1.5}, "--min-agreement 1.5: must be in"),
        ({"precision": "int8", "calib": "calib.npz", "int8_target": "tensorrt", "min_agreement": 0.9},
         "--int8-isa and --min-agreement apply to the cpu int8 target"),
        ({"precision": "int8", "calib": "calib.npz", "int8_target": "gpu"}, "--target must be one of"),
        ({"save_optimized": True, "backend": "tensorrt"}, "--save-optimized is an ONNX Runtime option"),
        ({"timing_cache": "t.cache"}, "--timing-cache is a TensorRT option"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(towers_dir, tmp_path, kwargs, message):
    with pytest.raises(DcncError, match=message.replace("(", r"\(")):
        build_bundle(towers_dir, tmp_path / "bundle", **kwargs)
    assert leftovers(tmp_path) == []


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def test_fp16_bundle_without_calibration_keeps_the_cross_branch_fp32_and_answers_like_torch(
    towers_dir, two_tower_model, tmp_path
):
    manifest = build_bundle(towers_dir / "query.onnx", tmp_path / "bundle", precision="fp16")
    record = manifest.towers["query"].lowering
    assert record.dtype == "fp16" and record.half_nodes > 0 and record.calibration is None
    assert any("cross branch" in reason for reason in record.kept_fp32.values())
    feed = random_inputs(two_tower_model.query.input_specs, 64, seed=5)
    with open_bundle(tmp_path / "bundle", tower="query") as runner, TorchRunner(two_tower_model.query) as reference:
        assert _cosine(runner.infer(feed)["embedding"], reference.infer(feed)["embedding"]) > 0.999


def test_fp16_with_calibration_chooses_fp32_nodes_from_measured_ranges(towers_dir, two_tower_model, tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    for name, tower in two_tower_model.towers().items():
        np.savez(calib / f"{name}_calib.npz", **random_inputs(tower.input_specs, 96, seed=1))
    manifest = build_bundle(towers_dir, tmp_path / "bundle", precision="fp16", calib=calib, calib_samples=64)
    for entry in manifest.towers.values():
        assert entry.lowering.calibration["samples"] >= 1 and entry.lowering.half_nodes > 0
        # a tiny tower stays far inside fp16's range: only the output tail is kept, not the cross branch
        assert not any("cross branch" in reason for reason in entry.lowering.kept_fp32.values())
    assert manifest.inputs["calib"]["sha256"] and manifest.inputs["lowering"]["calib_samples"] == 64


def test_int8_keep_fp32_of_a_node_no_tower_has_is_refused(towers_dir, two_tower_model, tmp_path):
    np.savez(tmp_path / "calib.npz", **random_inputs(two_tower_model.query.input_specs, 32, seed=1))
    with pytest.raises(DcncError, match="--keep-fp32 'nope': no tower graph has a node of that name"):
        build_bundle(towers_dir / "query.onnx", tmp_path / "bundle", precision="int8", calib=tmp_path / "calib.npz",
                     keep_fp32=("nope",))  # fmt: skip
    assert leftovers(tmp_path) == ["calib.npz"]


def test_missing_calibration_data_is_named(towers_dir, tmp_path):
    with pytest.raises(DcncError, match="--calib .*missing.npz: not found"):
        build_bundle(towers_dir, tmp_path / "bundle", precision="int8", calib=tmp_path / "missing.npz")


def test_missing_model_and_empty_directory_are_refused(tmp_path):
    with pytest.raises(DcncError, match="nope.onnx: not found"):
        build_bundle(tmp_path / "nope.onnx", tmp_path / "bundle")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DcncError, match="holds no <tower>.onnx"):
        build_bundle(tmp_path / "empty", tmp_path / "bundle")


def test_corrupt_tower_fails_the_build_and_leaves_nothing_behind(towers_dir, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(towers_dir, models)
    (models / "zzz.onnx").write_bytes(b"not a protobuf")  # sorted last: the good towers are built first
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    with pytest.raises(DcncError, match="zzz.onnx: not a readable ONNX model"):
        build_bundle(models, out_parent / "bundle")
    assert leftovers(out_parent) == []


def test_output_under_a_file_is_unwritable(towers_dir, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DcncError, match="cannot be created: .*file is not a folder"):
        build_bundle(towers_dir, tmp_path / "file" / "bundle")


@pytest.mark.skipif(
    "CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="onnxruntime-gpu is installed here"
)
def test_ort_cuda_without_onnxruntime_gpu_says_how_to_get_it(towers_dir, tmp_path):
    with pytest.raises(DcncError, match="needs onnxruntime-gpu .* install onnxruntime-gpu"):
        build_bundle(towers_dir, tmp_path / "bundle", backend="ort-cuda")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("option", "flag"), [("cuda_graph", "--cuda-graph"), ("allow_tf32", "--allow-tf32")])
def test_gpu_options_on_the_cpu_backend_are_refused(towers_dir, tmp_path, option, flag):
    from toolkit.backends.ort.loader import OrtOptions

    with pytest.raises(DcncError, match=f"{flag} needs a GPU backend"):
        build_bundle(towers_dir, tmp_path / "bundle", ort_options=OrtOptions(**{option: True}))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("text", "expected"), [("1:256:4096", (1, 256, 4096)), ("64", (64, 64, 64))])
def test_batch_profile_parses(text, expected):
    assert parse_batch(text) == expected


@pytest.mark.parametrize("text", ["0:1:2", "8:4:16", "1:2", "a:b:c", "-1:2:3"])
def test_bad_batch_profile_is_refused(text):
    with pytest.raises(DcncError, match="--batch"):
        parse_batch(text)


# --- the command line ---------------------------------------------------------------------------------------
def test_cli_builds_and_prints_one_line(towers_dir, tmp_path):
    result = CliRunner().invoke(app, ["build", str(towers_dir), "-o", str(tmp_path / "b"), "--batch", "1:4:16"])
    assert result.exit_code == 0, result.output
    assert "ort fp32 bundle, towers item, query" in result.output
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["batch"]["max"] == 16


@pytest.mark.parametrize(
    "args",
    [
        ["--backend", "tvm"],
        ["--precision", "bf16"],
        ["--precision", "int8"],
        ["--precision", "int8", "--calib", "nowhere.npz"],
        ["--batch", "9:3:1"],
        ["--ort-opt-level", "max"],
        ["--threads", "0"],
        ["--trt-opt-level", "9"],
        ["--hardware-compat", "any"],
        ["--allow-tf32"],
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(towers_dir, tmp_path, args):
    result = CliRunner().invoke(app, ["build", str(towers_dir), "-o", str(tmp_path / "b"), *args])
    assert result.exit_code == 2
    assert result.output.startswith("error:") and result.output.strip().count("\n") == 0
    assert leftovers(tmp_path) == []


def test_cli_help_explains_every_option():
    result = CliRunner().invoke(app, ["build", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in (
        "--out", "--backend", "--precision", "--calib", "--batch", "--force", "--threads", "--ort-opt-level",
        "--save-optimized", "--device-id", "--cuda-graph", "--allow-tf32", "--trt-opt-level", "--max-aux-streams",
        "--version-compatible", "--hardware-compat", "--workspace", "--timing-cache",
    ):
        assert option in result.output
