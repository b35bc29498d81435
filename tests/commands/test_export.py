"""graphs.export and toolkit.evaluate.validate: zoo towers covering every pair of family, cross kind and structure
exported and checked against torch, determinism, metadata, graph passes in the saved file, and the refusals that
leave nothing on disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import zoo

from graphs import export as export_module
from graphs.export import export_tower, supported_opsets, tower_to_onnx
from graphs.passes.manager import DEFAULT_PASSES, GPU_PASSES
from toolkit import __version__
from toolkit.commands.export import export_model
from toolkit.core.errors import DcncError
from toolkit.core.signature import TensorSpec, random_inputs
from toolkit.evaluate.parity import DEFAULT_ATOL_SCALE, Tolerance, compare_outputs
from toolkit.evaluate.validate import ParityFailed, read_real_rows, validate_tower
from toolkit.model.checkpoint import save_checkpoint
from toolkit.model.loading import LoadedModel, LoadedTower, load_model

# What each family's towers return per sample: output name -> shape after the batch axis.
FAMILY_OUTPUTS = {
    "retrieval": {"query": {"embedding": (8,)}, "item": {"embedding": (8,)}},
    "ranking": {"ranker": {"logit": (), "probability": ()}},
    "projection": {"engagement": {"click": (), "like": ()}},
}
PARITY_BATCHES = (1, 7, 4096)


def zoo_checkpoint(folder: Path, family: str, kind: str = "full", structure: str = "parallel", **extra) -> Path:
    model, spec = zoo.zoo_model(family, kind, structure)
    path = folder / f"{family}-{kind}-{structure}.pt"
    save_checkpoint(model, spec, path, extra=extra or None)
    return path


def tower_feeds(tower: torch.nn.Module, batch: int) -> dict[str, np.ndarray]:
    return random_inputs(list(tower.input_specs), batch, seed=3)


def props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---- the zoo: forward shapes, and the exported file against torch


@pytest.mark.parametrize("family, kind, structure", zoo.GRID, ids=["-".join(c) for c in zoo.GRID])
def test_zoo_towers_return_their_outputs_per_sample(family, kind, structure):
    model, _ = zoo.zoo_model(family, kind, structure)
    for name, tower in model.towers().items():
        feeds = [torch.from_numpy(a) for a in tower_feeds(tower, 7).values()]
        with torch.inference_mode():
            outputs = tower(*feeds)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        shapes = {n: tuple(o.shape) for n, o in zip(tower.output_names, outputs)}
        assert shapes == {n: (7, *s) for n, s in FAMILY_OUTPUTS[family][name].items()}
        assert all(torch.isfinite(o).all() for o in outputs)
        if family == "retrieval":  # L2-normalised embeddings
            torch.testing.assert_close(outputs[0].norm(dim=-1), torch.ones(7))


@pytest.mark.parametrize("family, kind, structure", zoo.PAIRWISE, ids=["-".join(c) for c in zoo.PAIRWISE])
def test_exported_zoo_tower_matches_torch_within_1e5_of_scale_at_batch_1_7_and_4096(tmp_path, family, kind, structure):
    loaded = load_model(str(zoo_checkpoint(tmp_path, family, kind, structure)))
    name = next(iter(loaded.towers))  # retrieval: the query tower (the item tower is built alike)
    [result] = export_model(loaded, tmp_path / "tower.onnx", towers=[name], validate=False, passes="default")
    checks = validate_tower(loaded.towers[name], result.path, PARITY_BATCHES)
    assert {c.case for c in checks} == {f"random, batch {b}" for b in PARITY_BATCHES}
    assert len(checks) == len(PARITY_BATCHES) * len(FAMILY_OUTPUTS[family][name])
    failed = [(c.output, c.case, c.reason or c.cosine) for c in checks if not c.passed]
    assert not failed
    worst = max(checks, key=lambda c: c.error_to_scale)
    assert worst.error_to_scale <= 1e-5, f"{worst.output} on {worst.case}: max abs {worst.max_abs:.3g}"


# ---- one exported ranker, shared by the tests of what the file holds


@pytest.fixture(scope="module")
def ranker(tmp_path_factory) -> tuple[Path, Path, LoadedModel]:
    """The zoo ranker (full rank, parallel) with 40 evaluation rows beside its checkpoint, exported with
    the default passes and validated at batch 1 and 64: (checkpoint, onnx file, loaded model)."""
    folder = tmp_path_factory.mktemp("ranker")
    model, _ = zoo.zoo_model("ranking", "full", "parallel")
    rows = tower_feeds(model.towers()["ranker"], 40)
    np.savez(folder / "eval.npz", **{f"ranker/{k}": v for k, v in rows.items()})
    checkpoint = zoo_checkpoint(folder, "ranking", "full", "parallel", eval_data="eval.npz")
    loaded = load_model(str(checkpoint))
    export_model(loaded, folder / "out" / "ranker.onnx", validate_batch=64, passes="default")
    return checkpoint, folder / "out" / "ranker.onnx", loaded


def test_exporting_twice_gives_byte_identical_files(ranker, tmp_path):
    checkpoint, first, _ = ranker
    [again] = export_model(load_model(str(checkpoint)), tmp_path / "ranker.onnx", validate_batch=64, passes="default")
    assert again.path.read_bytes() == first.read_bytes()
    assert again.sha256 == hashlib.sha256(first.read_bytes()).hexdigest()


def test_exported_file_has_stable_names_and_a_dynamic_batch_axis(ranker):
    _, path, _ = ranker
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["id_a", "id_b", "dense"]
    assert [o.name for o in graph.output] == ["logit", "probability"]
    assert {v.type.tensor_type.shape.dim[0].dim_param for v in [*graph.input, *graph.output]} == {"batch"}


def test_exported_file_is_self_contained(ranker):
    _, path, _ = ranker
    assert sorted(p.name for p in path.parent.iterdir()) == ["ranker.onnx"]
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in onnx.load(str(path)).graph.initializer)


def test_metadata_names_spec_tower_inputs_outputs_and_branches(ranker):
    _, path, loaded = ranker
    meta = props(path)
    assert meta["dcnc.spec"] == loaded.spec.to_toml()
    assert meta["dcnc.tower"] == "ranker"
    assert json.loads(meta["dcnc.inputs"]) == ["id_a:int64:B:20", "id_b:int64:B:7", "dense:float32:B,3"]
    assert json.loads(meta["dcnc.outputs"]) == ["logit", "probability"]
    assert json.loads(meta["dcnc.branches"]) == {
        "cross": ["interaction.cross"],
        "deep": ["interaction.deep"],
        "head": ["head"],
    }


def test_metadata_names_versions_and_the_source_hash(ranker):
    checkpoint, path, _ = ranker
    meta = props(path)
    assert meta["dcnc.version"] == __version__
    assert meta["torch.version"] == torch.__version__
    assert meta["onnx.version"] == onnx.__version__
    assert meta["dcnc.source"] == checkpoint.name  # the name, not the path: the same model, the same bytes
    assert meta["dcnc.source_kind"] == "checkpoint"
    assert meta["dcnc.source_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()


def test_metadata_records_each_default_pass_with_node_counts_and_no_timings(ranker):
    _, path, _ = ranker
    records = json.loads(props(path)["dcnc.passes"])
    assert [r["name"] for r in records] == list(DEFAULT_PASSES)
    assert all(set(r) == {"name", "nodes_before", "nodes_after", "changes"} for r in records)
    assert records[-1]["nodes_after"] == len(onnx.load(str(path)).graph.node)
    assert any("named 2 cross layer(s)" in change for change in records[-1]["changes"])


def test_saved_graph_is_the_one_the_passes_made(ranker):
    _, path, _ = ranker
    names = [n.name for n in onnx.load(str(path)).graph.node]
    assert any(n.startswith("cross/") for n in names) and any(n.startswith("deep/") for n in names)


def test_validation_covers_batch_1_the_large_batch_and_the_checkpoint_rows(ranker):
    _, path, loaded = ranker
    rows = read_real_rows(loaded.eval_data, loaded.towers["ranker"], 64)
    checks = validate_tower(loaded.towers["ranker"], path, (1, 64), rows)
    assert sorted({c.case for c in checks}) == ["random, batch 1", "random, batch 64", "real rows (40)"]
    assert all(c.passed for c in checks)


def test_tolerances_of_zero_fail_what_the_default_tolerance_passes(ranker):
    # ORT and torch sum in different orders: exact equality does not hold on every element of a large batch
    _, path, loaded = ranker
    exact = validate_tower(loaded.towers["ranker"], path, (1, 4096), tolerance=Tolerance(atol=0.0, rtol=0.0))
    default = validate_tower(loaded.towers["ranker"], path, (1, 4096))
    assert not all(c.passed for c in exact) and all(c.passed for c in default)


# ---- graph passes: which ran, and that validation reads the file they produced


@pytest.fixture(scope="module")
def raw_ranker_graph(ranker) -> bytes:
    _, _, loaded = ranker
    return tower_to_onnx(loaded.towers["ranker"]).SerializeToString()


@pytest.fixture
def reused_export(monkeypatch, raw_ranker_graph):
    """tower_to_onnx answers with the ranker exported once: for tests of what happens after the exporter."""
    monkeypatch.setattr(export_module, "tower_to_onnx", lambda tower, opset=18: onnx.load_from_string(raw_ranker_graph))


def test_no_passes_saves_the_exporter_graph_and_an_empty_record(ranker, reused_export, raw_ranker_graph, tmp_path):
    _, _, loaded = ranker
    result = export_tower(loaded.towers["ranker"], tmp_path / "raw.onnx", passes="none")
    saved = onnx.load(str(result.path))
    assert [n.name for n in saved.graph.node] == [n.name for n in onnx.load_from_string(raw_ranker_graph).graph.node]
    assert props(result.path)["dcnc.passes"] == "[]" and result.passes == []


def test_gpu_passes_run_the_default_ones_and_entry_fusion(ranker, reused_export, tmp_path):
    _, _, loaded = ranker
    result = export_tower(loaded.towers["ranker"], tmp_path / "gpu.onnx", passes="gpu")
    assert [r["name"] for r in json.loads(props(result.path)["dcnc.passes"])] == list(GPU_PASSES)
    assert [r.name for r in result.passes] == list(GPU_PASSES)


def test_passes_given_by_name_run_in_that_order(ranker, reused_export, tmp_path):
    _, _, loaded = ranker
    result = export_tower(loaded.towers["ranker"], tmp_path / "two.onnx", passes="canonicalize,cleanup")
    assert [r.name for r in result.passes] == ["canonicalize", "cleanup"]


def test_validation_checks_the_file_as_the_passes_left_it(ranker, reused_export, tmp_path):
    def scale_first_weight(model: onnx.ModelProto) -> onnx.ModelProto:  # a pass that is wrong
        weight = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2)
        array = onnx.numpy_helper.to_array(weight) * 1.5
        weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
        return model

    _, _, loaded = ranker
    with pytest.raises(ParityFailed) as failed:
        export_model(loaded, tmp_path / "bad.onnx", validate_batch=7, passes=scale_first_weight)
    assert failed.value.kept == [tmp_path / "bad.onnx"] and (tmp_path / "bad.onnx").is_file()
    assert not all(c.passed for c in failed.value.checks["ranker"])


def test_a_pass_that_fails_leaves_nothing_written(ranker, reused_export, tmp_path):
    def broken(model: onnx.ModelProto) -> onnx.ModelProto:
        raise DcncError("after pass 'fold': invalid ONNX graph (test)")

    _, _, loaded = ranker
    with pytest.raises(DcncError, match="tower ranker: after pass 'fold'"):
        export_model(loaded, tmp_path / "out" / "ranker.onnx", passes=broken)
    assert listing(tmp_path) == []


def test_unknown_pass_is_refused_before_anything_is_written(ranker, tmp_path):
    _, _, loaded = ranker
    with pytest.raises(DcncError, match="unknown pass 'fuse'"):
        export_model(loaded, tmp_path / "ranker.onnx", passes="cleanup,fuse")
    assert listing(tmp_path) == []


# ---- outputs, opsets, refusals


def test_selected_opset_is_the_file_opset(tmp_path):
    opset = supported_opsets()[-1]
    loaded = load_model(str(zoo_checkpoint(tmp_path, "ranking", "low_rank", "cross_only")))
    [result] = export_model(loaded, tmp_path / "r.onnx", opset=opset, validate_batch=7, passes="default")
    assert [o.version for o in onnx.load(str(result.path)).opset_import if o.domain in ("", "ai.onnx")] == [opset]
    assert all(c.passed for c in result.parity)


@pytest.mark.parametrize("opset", [17, supported_opsets()[-1] + 1])
def test_unsupported_opset_is_refused_before_anything_is_written(ranker, tmp_path, opset):
    _, _, loaded = ranker
    with pytest.raises(DcncError, match=f"--opset {opset}: .* supports opsets 18\\.\\."):
        export_model(loaded, tmp_path / "r.onnx", opset=opset)
    assert listing(tmp_path) == []


def test_existing_output_is_kept_without_force(ranker, tmp_path):
    _, _, loaded = ranker
    (tmp_path / "r.onnx").write_bytes(b"mine")
    with pytest.raises(DcncError, match="already exists"):
        export_model(loaded, tmp_path / "r.onnx")
    assert (tmp_path / "r.onnx").read_bytes() == b"mine"


def test_an_output_below_a_file_is_refused(ranker, tmp_path):
    _, _, loaded = ranker
    (tmp_path / "plain").write_text("")
    with pytest.raises(DcncError, match="is not a folder"):
        export_model(loaded, tmp_path / "plain" / "r.onnx")
    assert listing(tmp_path) == ["plain"]


class Cumulative(torch.nn.Module):
    """A running maximum: aten.cummax has no ONNX translation."""

    def forward(self, x):
        return torch.cummax(x, dim=1).values


class SignDependent(torch.nn.Module):
    """Python control flow on a tensor's value: no graph holds it."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


@pytest.mark.parametrize(
    "module, message",
    [
        (Cumulative(), "cannot export tower user: aten.cummax.default: No ONNX function"),
        (SignDependent(), "cannot export tower user: .*data-dependent.*forward branches on a tensor's values"),
    ],
    ids=["no-onnx-translation", "data-dependent-branch"],
)
def test_a_tower_the_exporter_cannot_handle_is_refused_leaving_nothing_written(tmp_path, module, message):
    tower = LoadedTower("user", module, [TensorSpec("x", "float32", ("B", 4))], ["y"])
    loaded = LoadedModel({tower.name: tower}, None, "tests:user", "", "factory")
    with pytest.raises(DcncError, match=message):
        export_model(loaded, tmp_path / "sub" / "r.onnx")
    assert listing(tmp_path) == []


# ---- toolkit.evaluate.validate: the judgement itself


def test_default_tolerance_scales_with_the_output():
    reference = {"logit": np.array([30.0, -30.0], dtype=np.float32)}
    near = {"logit": reference["logit"] + 30.0 * DEFAULT_ATOL_SCALE * 0.5}
    far = {"logit": reference["logit"] + 30.0 * DEFAULT_ATOL_SCALE * 4}
    assert compare_outputs(reference, near)[0].passed
    assert not compare_outputs(reference, far)[0].passed


def test_nan_where_torch_is_finite_fails():
    [check] = compare_outputs({"y": np.ones(3)}, {"y": np.array([1.0, np.nan, 1.0])}, Tolerance(atol=1.0, rtol=1.0))
    assert not check.passed and check.where == (1,)


def test_a_wrong_shape_fails_with_the_reason():
    [check] = compare_outputs({"y": np.ones((2, 3))}, {"y": np.ones((3, 2))})
    assert not check.passed and check.reason == "shape [3, 2], expected [2, 3]"
