"""Which calibration source belongs to which tower, and example datasets as a source."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.commands.calibration_data import (
    calibration_data,
    check_source,
    source_identity,
    tower_source,
)
from toolkit.core.errors import DcncError
from toolkit.core.signature import TensorSpec

QUERY = [TensorSpec("user_id", "int64", ("B",)), TensorSpec("user_profile", "float32", ("B", 8))]
ITEM = [TensorSpec("item_id", "int64", ("B",))]


def _save(path, specs, rows=16):
    arrays = {s.name: np.ones((rows, *s.shape[1:]), dtype=s.dtype) for s in specs}
    np.savez(path, **arrays)
    return path


def test_a_folder_gives_each_tower_its_named_file(tmp_path):
    query, item = _save(tmp_path / "query_calib.npz", QUERY), _save(tmp_path / "item_calib.npz", ITEM)
    assert tower_source(tmp_path, "query", QUERY) == query and tower_source(tmp_path, "item", ITEM) == item


def test_a_folder_without_tower_names_gives_the_file_whose_keys_are_the_towers_inputs(tmp_path):
    query, item = _save(tmp_path / "a.npz", QUERY), _save(tmp_path / "b.npz", ITEM)
    assert tower_source(tmp_path, "query", QUERY) == query and tower_source(tmp_path, "item", ITEM) == item


def test_a_folder_of_shards_of_one_tower_is_read_whole(tmp_path):
    _save(tmp_path / "part-0.npz", QUERY), _save(tmp_path / "part-1.npz", QUERY)
    assert tower_source(tmp_path, "query", QUERY) == tmp_path
    assert calibration_data(tmp_path, "query", QUERY).num_samples == 32


def test_a_mapping_names_one_source_per_tower(tmp_path):
    query = _save(tmp_path / "q.npz", QUERY)
    assert tower_source({"query": query}, "query", QUERY) == query
    with pytest.raises(DcncError, match="no calibration data for tower item"):
        calibration_data({"query": query}, "item", ITEM)


def test_dataset_source_draws_tower_inputs_from_the_example_dataset():
    data = calibration_data("dataset:synthetic", "query", QUERY, samples=64, seed=0)
    assert data.num_samples == 64 and data.arrays["user_profile"].dtype == np.float32
    assert source_identity("dataset:synthetic") == {"path": "dataset:synthetic", "sha256": None}


def test_a_missing_source_is_refused_before_any_work(tmp_path):
    with pytest.raises(DcncError, match="not found"):
        check_source({"query": tmp_path / "absent.npz"})
