"""`dcnc build --precision int8 --calib DIR` end to end on an ONNX Runtime CPU bundle of a two-tower."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
from calib_towers import random_feeds, tower_graph
from typer.testing import CliRunner

from cli import app


def _item_graph() -> onnx.ModelProto:
    """The query graph with its inputs renamed item_*: a second tower with other input names."""
    model = tower_graph()
    renames = {i.name: i.name.replace("user_", "item_") for i in model.graph.input}
    for value in model.graph.input:
        value.name = renames[value.name]
    for node in model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
    return model


def test_int8_cpu_bundle_is_built_per_tower_from_a_calibration_folder(tmp_path):
    towers, calib = tmp_path / "towers", tmp_path / "calib"
    towers.mkdir()
    calib.mkdir()
    graphs = {"query": tower_graph(), "item": _item_graph()}
    for name, graph in graphs.items():
        onnx.save(graph, towers / f"{name}.onnx")
        np.savez(calib / f"{name}_calib.npz", **random_feeds(graph, 128, seed=2))

    result = CliRunner().invoke(app, ["build", str(towers), "--out", str(tmp_path / "bundle"),
                                      "--precision", "int8", "--calib", str(calib)])  # fmt: skip

    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["inputs"]["lowering"]["target"] == "cpu"
    for name, graph in graphs.items():
        int8 = onnx.load(tmp_path / "bundle" / f"{name}.onnx")
        assert any(node.op_type == "QuantizeLinear" for node in int8.graph.node)
        record = json.loads(next(p.value for p in int8.metadata_props if p.key == "dcnc.lowering"))
        # half the rows calibrate, the other half (distinct rows) judge the search
        assert record["target"] == "cpu" and record["calibration_samples"] == 64
        assert 2 <= record["search"]["held_out_rows"] <= 64
        feeds = random_feeds(graph, 32, seed=7)
        got = ort.InferenceSession(int8.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        want = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        assert np.mean(np.sum(got * want, axis=1)) > 0.98  # unit embeddings: mean cosine to FP32


def test_int8_build_with_data_for_no_tower_is_exit_2_and_leaves_nothing(tmp_path):
    onnx.save(tower_graph(), tmp_path / "query.onnx")
    np.savez(tmp_path / "calib.npz", other=np.zeros((4, 3), np.float32))
    result = CliRunner().invoke(app, ["build", str(tmp_path / "query.onnx"), "--out", str(tmp_path / "bundle"),
                                      "--precision", "int8", "--calib", str(tmp_path / "calib.npz")])  # fmt: skip
    assert result.exit_code == 2 and "calib.npz" in result.output and "missing input" in result.output
    assert not (tmp_path / "bundle").exists()
