"""Sensitivity analysis: units by granularity, and a run that recovers recall on a trained two-tower."""

from __future__ import annotations

import onnx
import pytest
from calib_towers import tower_graph, trained_two_tower

from calibration.cache import calibrated_ranges
from calibration.qdq import quantizable_nodes, quantize_with_ranges
from calibration.reader import load_calibration
from calibration.sensitivity import group_units, sensitivity
from toolkit.backends.ort.loader import ort_session
from toolkit.core.errors import DcncError
from toolkit.core.onnxio import graph_inputs
from toolkit.evaluate.task_metrics import agreement_metric


def test_units_group_nodes_by_layer_and_branch():
    model = tower_graph()
    nodes = quantizable_nodes(model, "cpu")
    layers = group_units(model, nodes, "layer")
    branches = group_units(model, nodes, "branch")
    assert {"cross/0", "cross/1", "deep/0", "deep/1", "head/0"} <= set(layers)
    assert {"cross", "deep", "head"} <= set(branches)
    assert sorted(n for group in branches.values() for n in group) == sorted(nodes)
    assert set(group_units(model, nodes, "node")) == set(nodes)


def test_unknown_granularity_is_a_user_error():
    with pytest.raises(DcncError, match="--granularity"):
        group_units(tower_graph(), [], "tensor")


@pytest.mark.slow
def test_sensitivity_recovers_neighbour_agreement_of_a_trained_query_tower(tmp_path_factory):
    trained = trained_two_tower(str(tmp_path_factory.mktemp("two_tower")))
    query = onnx.load_from_string(trained["graphs"]["query"])
    queries = {k.split("/", 1)[1]: v for k, v in trained["eval"].items() if k.startswith("query/")}
    data = load_calibration(trained["calib"]["query"], graph_inputs(query))
    ranges, _, _, _ = calibrated_ranges(query, data, "minmax")
    # top-100 neighbours among the eval queries: far stricter than recall, which all-INT8 already keeps here
    metric = agreement_metric(100)

    report = sensitivity(query, ranges, queries, metric, "agreement@100", "cpu", "layer", 0.98, time_latency=False)

    start, end = report.curve[0], report.curve[-1]
    assert start.ratio < 0.98 <= end.ratio and report.met
    assert end.ratio - start.ratio > 0.01  # measurably recovered
    assert len(end.kept) < len(report.units)  # and not by giving up INT8 altogether
    replayed, _ = quantize_with_ranges(query, ranges, "cpu", keep_fp32=report.keep_fp32)
    reference = ort_session(query).run(None, queries)[0]
    assert metric(reference, ort_session(replayed).run(None, queries)[0]) == pytest.approx(end.metric)
