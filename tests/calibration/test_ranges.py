"""Range collection: minmax is the observed extremes, entropy and percentile clip real 2048-bin histograms."""

from __future__ import annotations

import numpy as np
import pytest
from calib_towers import random_feeds, run, tower_graph

from calibration.ranges import collect_ranges, entropy_threshold, percentile_threshold
from calibration.reader import CalibrationData
from toolkit.core.errors import DcncError


def _histogram(values: np.ndarray, bins: int = 2048):
    amax = float(np.abs(values).max())
    return np.histogram(np.abs(values), bins=bins, range=(0, amax))[0], np.linspace(0, amax, bins + 1)


@pytest.fixture(scope="module")
def calibration():
    return CalibrationData(random_feeds(tower_graph(), 256, seed=3), batch_size=64)


def test_entropy_clips_gaussian_outliers_near_four_sigma():
    values = np.random.default_rng(0).standard_normal(200_000)
    values[:5] *= 40  # a few outliers stretch the minmax range tenfold
    threshold = entropy_threshold(*_histogram(values))
    assert 3.0 < threshold < 6.0 < np.abs(values).max()


def test_percentile_threshold_matches_numpy_within_a_bin():
    values = np.random.default_rng(1).standard_normal(200_000)
    hist, edges = _histogram(values)
    expected = np.percentile(np.abs(values), 99.9)
    assert abs(percentile_threshold(hist, edges, 99.9) - expected) <= edges[1] - edges[0]


def test_minmax_range_of_the_output_is_its_observed_extremes(calibration):
    model = tower_graph()
    ranges = collect_ranges(model, calibration.batches, "minmax")
    output = run(model, calibration.arrays)[0]
    low, high = ranges.calibrated[model.graph.output[0].name]
    assert low == pytest.approx(output.min(), rel=1e-6) and high == pytest.approx(output.max(), rel=1e-6)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_clip_some_tensor_below_minmax(calibration, method):
    ranges = collect_ranges(tower_graph(), calibration.batches, method, percentile=99.0)
    narrower = [n for n in ranges.calibrated if ranges.calibrated[n][1] < 0.95 * ranges.minmax[n][1]]
    assert narrower  # through quantize_static's defaults entropy would equal minmax everywhere


def test_relu_zeros_do_not_drag_the_entropy_threshold_down(calibration):
    model = tower_graph()
    ranges = collect_ranges(model, calibration.batches, "entropy")
    relu_outputs = [node.output[0] for node in model.graph.node if node.op_type == "Relu"]
    assert relu_outputs
    for name in relu_outputs:  # half of a ReLU's outputs are exact zeros; with them binned, T fell to ~1/8
        assert ranges.calibrated[name][1] > 0.5 * ranges.minmax[name][1]


def test_unknown_method_is_a_user_error(calibration):
    with pytest.raises(DcncError, match="--calib-method"):
        collect_ranges(tower_graph(), calibration.batches, "kl")


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_clipped_share_is_the_share_of_values_outside_the_chosen_range(calibration, method):
    model = tower_graph()
    ranges = collect_ranges(model, calibration.batches, method, percentile=99.0)
    name = model.graph.output[0].name
    values = run(model, calibration.arrays)[0]
    low, high = ranges.calibrated[name]
    # the range ends are histogram bin edges: values on an edge may count on either side
    outside = np.mean((values < low) | (values > high))
    assert ranges.clipped[name] == pytest.approx(outside, abs=2 / values.size)
    if method == "minmax":
        assert not any(ranges.clipped.values())
    else:
        assert max(ranges.clipped.values()) > 0
