"""Outlier smoothing: an FP32 graph that computes what the original does, its scales folded into producers and
weights (the cross network as one region), and on a tower whose Gemm inputs have outlier channels, less INT8
error."""

from __future__ import annotations

import numpy as np
import pytest
from calib_towers import random_feeds, run, tower_graph

from calibration.qdq import quantize_with_ranges
from calibration.ranges import collect_ranges
from calibration.reader import CalibrationData
from calibration.smoothing import smooth_outliers
from toolkit.model.zoo.cross import CROSS_KINDS


def _outlier_feeds(model, rows: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs whose dense features are 5x the embeddings' scale, as unnormalised features are."""
    feeds = random_feeds(model, rows, seed)
    return {name: value * 5 if value.dtype == np.float32 else value for name, value in feeds.items()}


@pytest.mark.parametrize("kind", CROSS_KINDS)
def test_smoothed_graph_computes_what_the_original_does(kind):
    model = tower_graph("retrieval", kind)
    smoothed, record = smooth_outliers(model, CalibrationData(_outlier_feeds(model, 256, 3)).batches)
    feeds = _outlier_feeds(model, 64, 9)
    expected, got = run(model, feeds)[0], run(smoothed, feeds)[0]
    assert record.smoothed  # something was smoothed
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_the_cross_network_is_one_region_from_x0_to_the_head():
    model = tower_graph("retrieval", "low_rank")
    _, record = smooth_outliers(model, CalibrationData(_outlier_feeds(model, 256, 3)).batches)
    x0 = next(r for r in record.smoothed if r["seed"] == "node_cat")
    assert x0["error_after"] < x0["error_before"]
    # both cross layers' down projections, the deep branch's first Gemm and the head read x0's scales
    assert {"cross/0/Gemm", "cross/1/Gemm", "deep/0/Gemm", "head/0/Gemm"} <= set(x0["absorbers"])
    assert record.inserted  # the dense graph input is divided by a Mul (the tables by their columns)


def test_a_diag_scale_term_leaves_the_cross_network_unsmoothed_with_the_reason():
    model = tower_graph("retrieval", "full")  # the zoo's full-rank cross layers add diag_scale * x_l
    _, record = smooth_outliers(model, CalibrationData(_outlier_feeds(model, 64, 3)).batches)
    x0 = next(r for r in record.skipped if r["seed"] == "node_cat")
    assert "adds a tensor with other scales" in x0["reason"]


def test_smoothing_lowers_int8_error_on_a_tower_with_outlier_channels():
    model = tower_graph("retrieval", "mixture")
    calibration = CalibrationData(_outlier_feeds(model, 512, 3))
    smoothed, _ = smooth_outliers(model, calibration.batches)
    feeds = _outlier_feeds(model, 256, 9)
    expected = run(model, feeds)[0]

    def error(graph) -> float:
        int8, _ = quantize_with_ranges(graph, collect_ranges(graph, calibration.batches), "cpu", reduce_range=False)
        return float(np.linalg.norm(run(int8, feeds, unfused=True)[0] - expected) / np.linalg.norm(expected))

    assert error(smoothed) < 0.5 * error(model)  # measured 0.031 against 0.084
