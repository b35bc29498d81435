"""`dcnc build --precision int8 --calib DIR` end to end on an ONNX Runtime CPU bundle of a two-tower."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
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


def _two_tower(tmp_path):
    """query.onnx and item.onnx with 256 calibration rows each in one folder, as `dcnc train` writes them."""
    towers, calib = tmp_path / "towers", tmp_path / "calib"
    towers.mkdir()
    calib.mkdir()
    for name, graph in {"query": tower_graph(), "item": _item_graph()}.items():
        onnx.save(graph, towers / f"{name}.onnx")
        np.savez(calib / f"{name}_calib.npz", **random_feeds(graph, 256, seed=2))
    return towers, calib


def test_int8_manifest_records_the_isa_the_levers_and_the_search_curve(tmp_path):
    towers, calib = _two_tower(tmp_path)
    result = CliRunner().invoke(app, ["build", str(towers), "--out", str(tmp_path / "bundle"), "--precision", "int8",
                                      "--calib", str(calib), "--int8-isa", "avx2", "--min-agreement", "0.9"])  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["inputs"]["lowering"]["int8_isa"] == "avx2"
    for tower in ("query", "item"):
        record = manifest["towers"][tower]["lowering"]
        assert record["isa"] == "avx2" and record["config"]["reduce_range"]  # 7-bit weights for AVX2
        assert record["recipe"]["smooth"] and record["gemm_inputs"]
        search = record["search"]
        # two embedding towers share the budget: each meets 1 - (1 - 0.9) / 2
        assert search["target"] == pytest.approx(0.95) and search["embedding_towers"] == 2
        assert search["chosen"]["agreement"]["agreement@100"] >= 0.95
        assert all(p["speedup"] > 0 for p in search["points"])
        assert f"{tower}: " in result.output and "search: agreement@100 >= 0.95" in result.output


def test_min_agreement_0_builds_plain_int8_with_nothing_kept(tmp_path):
    towers, calib = _two_tower(tmp_path)
    result = CliRunner().invoke(app, ["build", str(towers), "--out", str(tmp_path / "bundle"), "--precision", "int8",
                                      "--calib", str(calib), "--min-agreement", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    for entry in manifest["towers"].values():
        search = entry["lowering"]["search"]
        assert len(search["points"]) == 1 and search["chosen"]["kept"] == [] and entry["lowering"]["kept_fp32"] == []


def test_an_unreachable_min_agreement_is_refused_with_the_best_point_and_nothing_written(tmp_path):
    towers, calib = _two_tower(tmp_path)
    result = CliRunner().invoke(app, ["build", str(towers), "--out", str(tmp_path / "bundle"), "--precision", "int8",
                                      "--calib", str(calib), "--min-agreement", "1"])  # fmt: skip
    assert result.exit_code == 2
    assert "int8 tower item: held-out agreement@100 reaches at best" in result.output
    assert "layers kept FP32:" in result.output and "split over 2 embedding towers" in result.output
    assert not (tmp_path / "bundle").exists()


def _build_raw(tmp_path, *extra: str):
    """An INT8 build of the query tower with the exporter's names (no canonicalize pass) and its record."""
    raw = tower_graph()
    for index, node in enumerate(raw.graph.node):
        node.name = f"node_{index}"
    onnx.save(raw, tmp_path / "query.onnx")
    np.savez(tmp_path / "query_calib.npz", **random_feeds(raw, 128, seed=2))
    result = CliRunner().invoke(app, ["build", str(tmp_path / "query.onnx"), "--out", str(tmp_path / "bundle"),
                                      "--precision", "int8", "--calib", str(tmp_path / "query_calib.npz"), *extra])  # fmt: skip
    assert result.exit_code == 0, result.output
    int8 = onnx.load(tmp_path / "bundle" / "query.onnx")
    metadata = {p.key: json.loads(p.value) for p in int8.metadata_props if p.key.startswith("dcnc.")}
    return {node.name for node in int8.graph.node}, metadata


def test_an_export_without_canonical_names_is_searched_by_canonical_layers(tmp_path):
    names, metadata = _build_raw(tmp_path)
    # head/0's Concat and Gemm now form one unit the search can keep FP32 together
    assert {"head/0/Concat", "head/0/Gemm", "cross/1/Mul"} <= names
    assert [record["name"] for record in metadata["dcnc.passes"]] == ["canonicalize"]


def test_nodes_named_by_keep_fp32_keep_their_names(tmp_path):
    names, metadata = _build_raw(tmp_path, "--keep-fp32", "node_19")  # the head's first Gemm
    assert "node_19" in names and "head/0/Gemm" not in names
    assert "node_19" in metadata["dcnc.lowering"]["kept_fp32"] and "dcnc.passes" not in metadata
