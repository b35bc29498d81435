"""`dcnc calibrate`: writes the keyed cache (and a TensorRT table), reuses it, and turns bad data into exit 2."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from calib_towers import random_feeds, tower_graph
from typer.testing import CliRunner

from cli import app


@pytest.fixture()
def model_path(tmp_path):
    path = tmp_path / "tower.onnx"
    onnx.save(tower_graph(), path)
    return path


@pytest.fixture()
def calib_path(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, **random_feeds(tower_graph(), 64, seed=3))
    return path


def _calibrate(*args):
    return CliRunner().invoke(app, ["calibrate", *map(str, args)])


def test_calibrate_writes_the_cache_then_reuses_it(tmp_path, model_path, calib_path):
    out = tmp_path / "out"
    first = _calibrate(model_path, "--calib", calib_path, "--out", out, "--calib-method", "percentile")
    second = _calibrate(model_path, "--calib", calib_path, "--out", out, "--calib-method", "percentile")
    assert first.exit_code == 0 and "written" in first.stdout
    assert second.exit_code == 0 and "reused" in second.stdout
    assert json.loads((out / "calibration.json").read_text())["made_from"]["percentile"] == 99.99


def test_calibrate_writes_a_tensorrt_table_for_the_named_version(tmp_path, model_path, calib_path):
    out = tmp_path / "out"
    result = _calibrate(model_path, "--calib", calib_path, "--out", out, "--trt-table", "--trt-version", "8.6.1")
    lines = (out / "calibration.trt.cache").read_text().splitlines()
    assert result.exit_code == 0 and lines[0] == "TRT-8601-MinMaxCalibration" and len(lines) > 10


def test_calibrate_with_eval_writes_a_sensitivity_curve(tmp_path, model_path, calib_path):
    out = tmp_path / "out"
    eval_path = tmp_path / "eval.npz"
    np.savez(eval_path, **random_feeds(tower_graph(), 200, seed=5))
    result = _calibrate(model_path, "--calib", calib_path, "--out", out, "--eval", eval_path,
                        "--granularity", "branch", "--min-metric-ratio", "0.999")  # fmt: skip
    report = json.loads((out / "sensitivity.json").read_text())
    assert result.exit_code == 0, result.output
    assert report["metric"] == "agreement@100" and report["curve"][0]["kept"] == []
    assert report["met"] == (report["curve"][-1]["ratio"] >= 0.999)


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda f: f.update(user_dense=np.full_like(f["user_dense"], np.nan)), "NaN"),
        (lambda f: f.update(dense=f.pop("user_dense")), "missing input 'user_dense'"),
        (lambda f: f.update(user_dense=f["user_dense"][:, :1]), "shape"),
        (lambda f: f.update(junk=np.array([{}], dtype=object)), "pickled"),
    ],
    ids=["nan", "wrong-name", "wrong-shape", "pickled-object"],
)
def test_bad_calibration_data_is_exit_2_and_writes_nothing(tmp_path, model_path, spoil, message):
    feeds = random_feeds(tower_graph(), 32)
    spoil(feeds)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **feeds)  # numpy pickles object arrays into the .npz
    result = _calibrate(model_path, "--calib", bad, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "bad.npz" in result.output and message in result.output
    assert not (tmp_path / "out" / "calibration.json").exists()


def test_missing_model_is_exit_2(tmp_path, calib_path):
    result = _calibrate(tmp_path / "none.onnx", "--calib", calib_path, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "not found" in result.output
