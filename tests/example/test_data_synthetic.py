"""The synthetic dataset: deterministic from its seed, valid tables, and latent structure a model can learn."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.core.errors import DcncError
from toolkit.evaluate.metrics import recall_at_k
from toolkit.example.data import load_dataset
from toolkit.example.data.evalsplit import split_interactions
from toolkit.example.data.synthetic import generate


def small(seed: int = 0):
    return generate(seed=seed, num_users=300, num_items=400, mean_interactions=20)


def test_same_seed_gives_identical_arrays():
    a, b = small(3), small(3)
    assert a.fingerprint() == b.fingerprint()
    assert np.array_equal(a.item, b.item) and np.array_equal(a.rating, b.rating)
    assert np.array_equal(a.user_features["user_profile"], b.user_features["user_profile"])


def test_another_seed_gives_other_interactions():
    assert small(0).fingerprint() != small(1).fingerprint()


def test_feature_tables_have_one_row_per_user_and_item_and_ids_within_cardinality():
    data = small()
    assert data.num_users == 300 and data.num_items == 400
    for table in (data.user_features, data.item_features):
        for name, array in table.items():
            if array.dtype == np.int64:
                assert 0 <= array.min() and array.max() < data.cardinalities[name], name
            else:
                assert array.dtype == np.float32 and np.isfinite(array).all(), name


def test_ratings_span_one_to_five_with_about_half_positive():
    data = small()
    assert set(np.unique(data.rating)) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert 0.45 < (data.rating >= 4).mean() < 0.65


def test_each_user_rates_an_item_at_most_once():
    data = small()
    pairs = data.user * data.num_items + data.item
    assert len(np.unique(pairs)) == data.num_interactions


def test_true_latent_scores_recall_held_out_items_far_above_chance():
    data = small()
    held_out = split_interactions(data, 0.2, seed=0).held_out
    users = np.unique(data.user[held_out])
    scores = data.latent["user"][users] @ data.latent["item"].T
    ranked = np.argsort(-scores, axis=1)[:, :40]
    relevance = np.stack([np.searchsorted(users, data.user[held_out]), data.item[held_out]], axis=1)
    chance = 40 / data.num_items
    assert recall_at_k(ranked, relevance, [40])[40] > 3 * chance


def test_higher_ratings_go_with_higher_latent_affinity():
    data = small()
    affinity = (data.latent["user"][data.user] * data.latent["item"][data.item]).sum(axis=1)
    assert affinity[data.rating >= 4].mean() > affinity[data.rating <= 2].mean() + 0.2


def test_too_small_a_dataset_is_refused():
    with pytest.raises(DcncError, match="num_items >= 10"):
        generate(num_items=5)


def test_synthetic_takes_no_data_dir(tmp_path):
    with pytest.raises(DcncError, match="--data-dir applies to --dataset movielens"):
        load_dataset("synthetic", tmp_path)


def test_unknown_dataset_name_is_refused():
    with pytest.raises(DcncError, match="dataset must be one of"):
        load_dataset("criteo")


def test_check_refuses_an_id_outside_its_cardinality():
    data = small()
    data.cardinalities["user_age"] = 3  # the table holds ages 0..6
    with pytest.raises(DcncError, match="user feature 'user_age' has ids outside \\[0, 3\\)"):
        data.check()
