"""Fixtures for the build / bundle / runner tests: tiny dcnc towers exported to ONNX once per session."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from toolkit.model.spec import (
    CrossSpec,
    DenseFeature,
    ModelSpec,
    SparseFeature,
    TowerSpec,
)
from toolkit.model.zoo.families import build_model


def tiny_two_tower_spec() -> ModelSpec:
    """A retrieval model small enough to export in seconds: one id feature, one dense feature per tower."""

    def tower() -> TowerSpec:
        return TowerSpec(
            sparse=[SparseFeature("user_id", 50, 4)], dense=[DenseFeature("profile", 6)],
            cross=CrossSpec(kind="full", layers=2), deep=[16], out_dim=8,
        )

    spec = ModelSpec(family="retrieval", towers={"query": tower(), "item": tower()}, name="tiny")
    spec.validate()
    return spec


def export_tower(tower: torch.nn.Module, path: Path) -> Path:
    """torch -> ONNX with a dynamic batch (dynamo exporter), inputs and outputs named as the tower names them."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    args = tuple(torch.from_numpy(s.random(3, __import__("numpy").random.default_rng(0))) for s in tower.input_specs)
    program = torch.onnx.export(
        tower, args, input_names=[s.name for s in tower.input_specs],
        dynamic_shapes=(tuple({0: batch} for _ in args),), dynamo=True, verbose=False,
    )
    model = program.model_proto
    _rename_outputs(model, list(tower.output_names))
    # weights in a side file, as torch's exporter writes them, so external data is exercised
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=256)
    return path


def _rename_outputs(model: onnx.ModelProto, names: list[str]) -> None:
    """Give the graph outputs the tower's names. (torch 2.13's `output_names=` can collide with an internal value
    of the same name, e.g. the Gather called "embedding", and write an invalid graph, so rename by hand.)"""
    wanted = dict(zip([o.name for o in model.graph.output], names, strict=True))
    taken = {v for n in model.graph.node for v in n.output} - set(wanted)
    renames = {v: f"{v}_inner" for v in taken if v in names}
    renames.update(wanted)
    for node in model.graph.node:
        node.input[:] = [renames.get(v, v) for v in node.input]
        node.output[:] = [renames.get(v, v) for v in node.output]
    for value in list(model.graph.output) + list(model.graph.value_info):
        value.name = renames.get(value.name, value.name)


@pytest.fixture(scope="session")
def two_tower_spec() -> ModelSpec:
    return tiny_two_tower_spec()


@pytest.fixture(scope="session")
def two_tower_model(two_tower_spec) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(two_tower_spec).eval()


@pytest.fixture(scope="session")
def towers_dir(two_tower_model, tmp_path_factory) -> Path:
    """A directory holding query.onnx and item.onnx (with their external data files), as `dcnc export` writes."""
    folder = tmp_path_factory.mktemp("exported")
    for name, tower in two_tower_model.towers().items():
        export_tower(tower, folder / f"{name}.onnx")
    return folder


@pytest.fixture(scope="module")
def verify_case(tmp_path_factory) -> Path:
    """An end-to-end verify case (verify_cases.build_verify_case): model.pt, eval.npz, bundle/, broken/."""
    from verify_cases import build_verify_case

    return build_verify_case(tmp_path_factory.mktemp("verify"))


@pytest.fixture(scope="session")
def corpus_case(tmp_path_factory) -> Path:
    """A 200k-item corpus case (corpus_cases.build_corpus_case): model.pt, bundle/, items/, eval.npz."""
    from corpus_cases import build_corpus_case

    return build_corpus_case(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole session (2 CPUs, no dashboard), shut down at the end: starting Ray
    costs seconds, so the Ray tests share it (dcnc's Ray engine uses a session it finds already connected)."""
    import logging

    ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'dcnc[ray]'")
    pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'dcnc[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_case(tmp_path_factory):
    """The hostile battery's case (hostile_cases.Case): read it, never change it (own_case is a private copy)."""
    from hostile_cases import make_case

    return make_case(tmp_path_factory.mktemp("hostile") / "case")


@pytest.fixture
def own_case(shared_case, tmp_path):
    """A private copy of shared_case, in tmp_path/case, for a test that damages it."""
    return shared_case.copy(tmp_path / "case")
