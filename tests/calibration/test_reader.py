"""Calibration data sources: .npz, .npy, shard folders, sub-sampling, and bad data."""

from __future__ import annotations

import numpy as np
import pytest
from calib_towers import random_feeds, tower_graph

from calibration.reader import CalibrationData, load_calibration
from toolkit.core.errors import DcncError
from toolkit.core.onnxio import graph_inputs
from toolkit.core.signature import TensorSpec


@pytest.fixture(scope="module")
def specs():
    return graph_inputs(tower_graph())


@pytest.fixture(scope="module")
def feeds():
    return random_feeds(tower_graph(), 40)


def test_graph_inputs_keep_the_batch_dim_symbolic(specs):
    assert [s.dtype for s in specs] == ["int64", "int64", "float32"]
    assert all(isinstance(s.shape[0], str) for s in specs) and specs[2].shape[1] == 3


def test_npz_source_holds_every_input_row(tmp_path, specs, feeds):
    np.savez(tmp_path / "c.npz", **feeds)
    data = load_calibration(tmp_path / "c.npz", specs)
    assert data.num_samples == 40 and set(data.arrays) == set(feeds)


def test_npy_source_feeds_a_single_input_graph(tmp_path):
    spec = [TensorSpec("x", "float32", ("B", 4))]
    np.save(tmp_path / "x.npy", np.ones((6, 4), np.float32))
    assert load_calibration(tmp_path / "x.npy", spec).arrays["x"].shape == (6, 4)


def test_npy_source_is_refused_for_a_multi_input_graph(tmp_path, specs):
    np.save(tmp_path / "x.npy", np.ones((6, 3), np.float32))
    with pytest.raises(DcncError, match="3 inputs"):
        load_calibration(tmp_path / "x.npy", specs)


def test_shard_folder_is_concatenated_in_name_order(tmp_path, specs, feeds):
    (tmp_path / "shards").mkdir()
    first = {k: v[:10] for k, v in feeds.items()}
    second = {k: v[10:] for k, v in feeds.items()}
    np.savez(tmp_path / "shards" / "b.npz", **second)
    np.savez(tmp_path / "shards" / "a.npz", **first)
    data = load_calibration(tmp_path / "shards", specs)
    np.testing.assert_array_equal(data.arrays[specs[2].name], feeds[specs[2].name])


def test_bad_shard_is_named_in_the_error(tmp_path, specs, feeds):
    (tmp_path / "shards").mkdir()
    np.savez(tmp_path / "shards" / "a.npz", **feeds)
    bad = dict(feeds)
    bad[specs[2].name] = bad[specs[2].name][:, :2]
    np.savez(tmp_path / "shards" / "b.npz", **bad)
    with pytest.raises(DcncError, match=r"b\.npz.*shape"):
        load_calibration(tmp_path / "shards", specs)


def test_subsampling_is_seeded_and_keeps_source_order(tmp_path, specs, feeds):
    np.savez(tmp_path / "c.npz", **feeds)
    name = specs[2].name
    a = load_calibration(tmp_path / "c.npz", specs, samples=10, seed=1).arrays[name]
    b = load_calibration(tmp_path / "c.npz", specs, samples=10, seed=1).arrays[name]
    c = load_calibration(tmp_path / "c.npz", specs, samples=10, seed=2).arrays[name]
    np.testing.assert_array_equal(a, b)
    assert len(a) == 10 and not np.array_equal(a, c)
    rows = [int(np.flatnonzero((feeds[name] == row).all(axis=1))[0]) for row in a]
    assert rows == sorted(rows)


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda f, n: f.update({n[2]: np.full_like(f[n[2]], np.nan)}), "NaN"),
        (lambda f, n: f.update({"wrong": f.pop(n[2])}), "missing input"),
        (lambda f, n: f.update({n[2]: f[n[2]][:, :2]}), "shape"),
        (lambda f, n: f.update({n[0]: f[n[0]].astype(np.float32)}), "dtype"),
    ],
    ids=["nan", "wrong-name", "wrong-shape", "wrong-dtype"],
)
def test_bad_npz_is_refused_with_file_and_input(tmp_path, specs, feeds, spoil, message):
    spoilt = dict(feeds)
    spoil(spoilt, [s.name for s in specs])
    np.savez(tmp_path / "bad.npz", **spoilt)
    with pytest.raises(DcncError, match=f"bad.npz.*{message}"):
        load_calibration(tmp_path / "bad.npz", specs)


def test_pickled_npy_is_refused_without_unpickling(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DcncError, match="pickled"):
        load_calibration(tmp_path / "obj.npy", [TensorSpec("x", "float32", ("B", 4))])


def test_pickled_npz_is_refused_without_unpickling(tmp_path, specs, feeds):
    np.savez(tmp_path / "obj.npz", **feeds, extra=np.array([object()], dtype=object))
    with pytest.raises(DcncError, match="pickled"):
        load_calibration(tmp_path / "obj.npz", specs)


def test_batches_cover_every_sample_once():
    data = CalibrationData({"x": np.arange(10, dtype=np.float32)[:, None]}, batch_size=4)
    assert [len(b["x"]) for b in data.batches()] == [4, 4, 2] and len(data) == 3
