"""The example trainer: specs fitted to the data, models that beat chance, and the files it writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toolkit.core.errors import DcncError
from toolkit.evaluate.evaldata import RankingEval, RetrievalEval, load_eval
from toolkit.evaluate.metrics import auc, recall_at_k
from toolkit.example.data.synthetic import generate
from toolkit.example.train import (
    TrainConfig,
    example_spec,
    fit_spec_to_data,
    train_ranker,
    train_two_tower,
)
from toolkit.model.checkpoint import load_checkpoint, read_checkpoint
from toolkit.model.spec import SparseFeature

TINY = dict(seed=0, num_users=300, num_items=500, mean_interactions=20)


@pytest.fixture(scope="module")
def data():
    return generate(**TINY)


@pytest.fixture(scope="module")
def two_tower_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_tower")
    return out, train_two_tower(data, out, config=TrainConfig(epochs=1, batch_size=128), quiet=True)


@pytest.fixture(scope="module")
def ranker_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranker")
    return out, train_ranker(data, out, config=TrainConfig(epochs=1, batch_size=64, lr=2e-3), quiet=True)


def test_fitting_sets_cardinalities_and_dense_widths_from_the_data(data):
    fitted = fit_spec_to_data(example_spec("ranker"), data)
    sparse = {f.name: f.cardinality for f in fitted.towers["ranker"].sparse}
    assert sparse["user_id"] == 300 and sparse["item_id"] == 500
    assert {f.name: f.dim for f in fitted.towers["ranker"].dense} == {"user_profile": 8, "item_profile": 8}


def test_example_specs_already_fit_the_default_synthetic_dataset():
    default = generate(seed=0)
    for name in ("two_tower", "ranker", "engagement"):
        spec = example_spec(name)
        assert fit_spec_to_data(spec, default).to_dict() == spec.to_dict(), name


def test_projection_sequence_gets_one_id_per_item_plus_padding(data):
    assert fit_spec_to_data(example_spec("engagement"), data).sequence.cardinality == 501


def test_query_tower_reading_an_item_feature_is_refused(data):
    spec = example_spec("two_tower")
    spec.towers["query"].sparse.append(SparseFeature("item_genre", 19, 4))
    with pytest.raises(DcncError, match="towers.query reads 'item_genre', which is not a user feature"):
        fit_spec_to_data(spec, data)


def test_one_epoch_two_tower_recalls_far_above_chance(two_tower_run, data):
    _, result = two_tower_run
    chance = 100 / data.num_items
    assert result["metrics"]["recall@100"] > 2 * chance


def test_one_epoch_ranker_auc_beats_chance(ranker_run):
    assert ranker_run[1]["metrics"]["auc"] > 0.6


def test_retrieval_eval_file_is_what_verify_reads(two_tower_run, data):
    out, result = two_tower_run
    model, _, _ = load_checkpoint(result["checkpoint"])
    towers = model.towers()
    evaluation = load_eval(result["eval_data"], {t: m.input_specs for t, m in towers.items()},
                           {t: m.output_names for t, m in towers.items()})  # fmt: skip
    assert isinstance(evaluation, RetrievalEval)
    assert len(evaluation.items["item_id"]) == data.num_items
    assert evaluation.relevance.dtype == np.int64


def test_ranking_eval_file_is_what_verify_reads(ranker_run):
    _, result = ranker_run
    model, _, _ = load_checkpoint(result["checkpoint"])
    evaluation = load_eval(result["eval_data"], {"ranker": model.input_specs}, {"ranker": model.output_names})
    assert isinstance(evaluation, RankingEval)
    assert evaluation.labels["logit"].dtype == np.float32


def test_calibration_files_are_keyed_by_tower_input_with_finite_in_range_values(two_tower_run, ranker_run):
    for _, result in (two_tower_run, ranker_run):
        model, _, _ = load_checkpoint(result["checkpoint"])
        for tower, path in result["calib_data"].items():
            specs = model.towers()[tower].input_specs
            with np.load(path, allow_pickle=False) as calib:
                assert sorted(calib.files) == sorted(s.name for s in specs)
                for spec in specs:
                    array = calib[spec.name]
                    assert array.dtype == np.dtype(spec.dtype) and len(array) == 2048
                    assert np.isfinite(array).all()
                    if spec.high is not None:
                        assert 0 <= array.min() and array.max() < spec.high


def test_checkpoint_extra_names_its_files_relative_to_its_folder(two_tower_run):
    out, result = two_tower_run
    extra = read_checkpoint(result["checkpoint"])["extra"]
    assert extra["dataset"] == "synthetic"
    assert extra["eval_data"] == "two_tower_eval.npz" and (out / extra["eval_data"]).is_file()
    assert extra["calib_data"] == {"query": "query_calib.npz", "item": "item_calib.npz"}
    assert set(extra["metrics"]) == {"recall@10", "recall@100"}


@torch.no_grad()
def test_stored_recall_is_reproduced_from_the_saved_checkpoint_and_eval_file(two_tower_run):
    _, result = two_tower_run
    model, _, _ = load_checkpoint(result["checkpoint"])
    with np.load(result["eval_data"]) as ev:
        query = model.query(*[torch.from_numpy(ev[f"query/{s.name}"]) for s in model.query.input_specs])
        items = model.item(*[torch.from_numpy(ev[f"item/{s.name}"]) for s in model.item.input_specs])
        ranked = torch.topk(query @ items.T, 100, dim=1).indices.numpy()
        recall = recall_at_k(ranked, ev["relevance"], [100])[100]
    assert recall == pytest.approx(result["metrics"]["recall@100"], abs=1e-6)


@torch.no_grad()
def test_stored_auc_is_reproduced_from_the_saved_checkpoint_and_eval_file(ranker_run):
    _, result = ranker_run
    model, _, _ = load_checkpoint(result["checkpoint"])
    with np.load(result["eval_data"]) as ev:
        logit, _ = model(*[torch.from_numpy(ev[s.name]) for s in model.input_specs])
        assert auc(ev["label"], logit.numpy()) == pytest.approx(result["metrics"]["auc"], abs=1e-6)


def test_same_seed_trains_identical_weights(data, tmp_path, ranker_run):
    again = train_ranker(data, tmp_path, config=TrainConfig(epochs=1, batch_size=64, lr=2e-3), quiet=True)
    first = read_checkpoint(ranker_run[1]["checkpoint"])["state_dict"]
    second = read_checkpoint(again["checkpoint"])["state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)
