"""The calibration cache: reused when graph, data and method match, recomputed otherwise; the TensorRT table."""

from __future__ import annotations

import json

import pytest
from calib_towers import random_feeds, tower_graph

import calibration.cache as calibrate_module
from calibration.cache import (
    CACHE_NAME,
    calibrated_ranges,
    read_tensorrt_table,
    tensorrt_table,
    tensorrt_version_code,
)
from calibration.ranges import RangeSet
from calibration.reader import CalibrationData
from toolkit.core.errors import DcncError


@pytest.fixture()
def calibration():
    return CalibrationData(random_feeds(tower_graph(), 64, seed=3), batch_size=64)


@pytest.fixture()
def counted(monkeypatch):
    """Counts real range collections (cache misses)."""
    calls = []
    real = calibrate_module.collect_ranges

    def collect(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrate_module, "collect_ranges", collect)
    return calls


def test_cache_is_reused_when_graph_data_and_method_match(tmp_path, calibration, counted):
    first, key, hit, _ = calibrated_ranges(tower_graph(), calibration, "entropy", cache_dir=tmp_path)
    again, key2, hit2, _ = calibrated_ranges(tower_graph(), calibration, "entropy", cache_dir=tmp_path)
    assert (hit, hit2, key == key2, len(counted)) == (False, True, True, 1)
    assert again.calibrated == first.calibrated  # JSON round-trips Python floats exactly


@pytest.mark.parametrize("change", ["data", "method", "graph"])
def test_cache_is_recomputed_when_its_key_changes(tmp_path, calibration, counted, change):
    calibrated_ranges(tower_graph(), calibration, "minmax", cache_dir=tmp_path)
    model, method = tower_graph(), "minmax"
    if change == "data":
        calibration = CalibrationData(random_feeds(model, 64, seed=4))
    elif change == "method":
        method = "percentile"
    else:
        model.graph.initializer[0].raw_data = bytes(len(model.graph.initializer[0].raw_data))
    _, _, hit, _ = calibrated_ranges(model, calibration, method, cache_dir=tmp_path)
    stored = json.loads((tmp_path / CACHE_NAME).read_text())
    assert not hit and len(counted) == 2 and stored["made_from"]["method"] == method


def test_corrupt_cache_is_recomputed_not_trusted(tmp_path, calibration, counted):
    (tmp_path / CACHE_NAME).write_text("{not json")
    _, _, hit, _ = calibrated_ranges(tower_graph(), calibration, "minmax", cache_dir=tmp_path)
    assert not hit and json.loads((tmp_path / CACHE_NAME).read_text())["schema"] == "dcnc.calibration/1"


def test_tensorrt_table_holds_amax_over_127_as_float_hex():
    ranges = RangeSet("entropy", {"x": (-2.0, 3.0), "y": (0.0, 1.0)}, {"x": (-2.0, 2.54), "y": (0.0, 1.0)})
    text = tensorrt_table(ranges, "10.13.3")
    assert text.splitlines()[0] == "TRT-101303-EntropyCalibration2"
    scales = read_tensorrt_table(text)
    assert scales == {"x": pytest.approx(2.54 / 127), "y": pytest.approx(1.0 / 127)}
    assert text.splitlines()[2] == "y: 3c010204"  # 1/127 as IEEE-754 float32 bits, as TensorRT writes them


def test_tensorrt_version_codes_follow_nv_tensorrt_version():
    assert tensorrt_version_code("8.6.1") == 8601 and tensorrt_version_code("10.13.3") == 101303
    with pytest.raises(DcncError, match="--trt-version"):
        tensorrt_version_code("ten")
