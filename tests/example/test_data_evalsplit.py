"""The held-out split and the eval / calibration .npz formats other stages read."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.core.errors import DcncError
from toolkit.example.data.evalsplit import (
    calibration_sample,
    ranking_eval,
    retrieval_eval,
    save_npz,
    split_interactions,
)
from toolkit.example.data.synthetic import generate

QUERY = ["user_id", "user_age", "user_profile"]
ITEM = ["item_id", "item_genre", "item_profile"]


@pytest.fixture(scope="module")
def data():
    return generate(seed=0, num_users=200, num_items=300, mean_interactions=15)


def test_split_is_disjoint_covers_everything_and_holds_out_the_fraction(data):
    split = split_interactions(data, 0.2, seed=0)
    assert len(np.intersect1d(split.train, split.held_out)) == 0
    assert len(split.train) + len(split.held_out) == data.num_interactions
    assert len(split.held_out) == round(0.2 * data.num_interactions)


def test_split_depends_only_on_its_seed(data):
    assert np.array_equal(split_interactions(data, 0.2, 5).held_out, split_interactions(data, 0.2, 5).held_out)
    assert not np.array_equal(split_interactions(data, 0.2, 5).held_out, split_interactions(data, 0.2, 6).held_out)


def test_eval_fraction_outside_zero_one_is_refused(data):
    with pytest.raises(DcncError, match="eval_fraction"):
        split_interactions(data, 1.0)


def test_retrieval_eval_has_query_rows_the_whole_corpus_and_int64_pairs(data):
    held_out = split_interactions(data, 0.2, 0).held_out
    arrays = retrieval_eval(data, held_out, QUERY, ITEM)
    queries = len(np.unique(data.user[held_out]))
    assert sorted(arrays) == sorted([f"query/{n}" for n in QUERY] + [f"item/{n}" for n in ITEM] + ["relevance"])
    assert all(len(arrays[f"query/{n}"]) == queries for n in QUERY)
    assert all(len(arrays[f"item/{n}"]) == data.num_items for n in ITEM)
    relevance = arrays["relevance"]
    assert relevance.dtype == np.int64 and relevance.shape == (len(held_out), 2)
    assert relevance[:, 0].max() < queries and relevance[:, 1].max() < data.num_items


def test_retrieval_relevance_pairs_are_the_held_out_interactions(data):
    held_out = split_interactions(data, 0.2, 0).held_out
    arrays = retrieval_eval(data, held_out, QUERY, ITEM)
    users = arrays["query/user_id"][arrays["relevance"][:, 0]]
    items = arrays["item/item_id"][arrays["relevance"][:, 1]]
    expected = set(zip(data.user[held_out].tolist(), data.item[held_out].tolist()))
    assert set(zip(users.tolist(), items.tolist())) == expected


def test_ranking_eval_has_one_row_per_held_out_interaction_and_float_labels(data):
    held_out = split_interactions(data, 0.2, 0).held_out
    arrays = ranking_eval(data, held_out, QUERY + ITEM)
    assert all(len(a) == len(held_out) for a in arrays.values())
    assert arrays["label"].dtype == np.float32 and set(np.unique(arrays["label"])) == {0.0, 1.0}
    assert np.array_equal(arrays["label"], (data.rating[held_out] >= 4).astype(np.float32))
    assert arrays["user_profile"].dtype == np.float32 and arrays["item_id"].dtype == np.int64


def test_calibration_sample_draws_only_training_rows(data):
    split = split_interactions(data, 0.2, 0)
    sample = calibration_sample(data, split.train, ["user_id", "item_id"], rows=100, seed=0)
    assert len(sample["user_id"]) == 100
    train_pairs = set(zip(data.user[split.train].tolist(), data.item[split.train].tolist()))
    assert set(zip(sample["user_id"].tolist(), sample["item_id"].tolist())) <= train_pairs


def test_unknown_feature_is_named(data):
    with pytest.raises(DcncError, match="no feature 'user_height'"):
        ranking_eval(data, np.arange(3), ["user_height"])


def test_saved_npz_loads_without_pickle(tmp_path, data):
    arrays = ranking_eval(data, np.arange(10), QUERY)
    save_npz(tmp_path / "eval.npz", arrays)
    with np.load(tmp_path / "eval.npz", allow_pickle=False) as loaded:
        assert sorted(loaded.files) == sorted(arrays)
        assert np.array_equal(loaded["user_profile"], arrays["user_profile"])


def test_object_arrays_are_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(DcncError, match="dtype object"):
        save_npz(tmp_path / "bad.npz", {"x": np.array([{"a": 1}], dtype=object)})
    assert list(tmp_path.iterdir()) == []
