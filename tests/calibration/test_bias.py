"""Bias correction: the mean shift INT8 puts on each Gemm's output, folded into its bias."""

from __future__ import annotations

import numpy as np
from calib_towers import random_feeds, run, tower_graph

from calibration.bias import correct_biases
from calibration.qdq import quantize_with_ranges
from calibration.ranges import collect_ranges
from calibration.reader import CalibrationData


def test_bias_correction_removes_most_of_the_mean_output_shift_of_7_bit_weights():
    model = tower_graph("retrieval", "full")
    calibration = CalibrationData(random_feeds(model, 512, seed=3))
    ranges = collect_ranges(model, calibration.batches)

    def quantize(graph):
        return quantize_with_ranges(graph, ranges, "cpu", reduce_range=True)[0]

    corrected, record = correct_biases(model, quantize, calibration.batches)
    feeds = random_feeds(model, 512, seed=9)  # rows the correction never saw
    expected = run(model, feeds)[0]
    shift_before = np.abs((run(quantize(model), feeds)[0] - expected).mean(axis=0)).mean()
    shift_after = np.abs((run(quantize(corrected), feeds)[0] - expected).mean(axis=0)).mean()
    assert shift_after < 0.5 * shift_before
    assert set(record.shifts) == {n.name for n in model.graph.node if n.op_type == "Gemm"}


def test_bias_correction_leaves_gemms_kept_in_float_alone():
    model = tower_graph("retrieval", "full")
    calibration = CalibrationData(random_feeds(model, 128, seed=3))
    ranges = collect_ranges(model, calibration.batches)
    kept = "head/1/Gemm"
    _, record = correct_biases(model, lambda g: quantize_with_ranges(g, ranges, "cpu", [kept])[0], calibration.batches)
    assert kept not in record.shifts and record.shifts
