"""Loading .npz input files and checking them against input signatures."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.core.errors import DcncError
from toolkit.core.npz import check_feeds, load_npz
from toolkit.core.signature import TensorSpec

SPECS = [TensorSpec("ids", "int64", ("B",), high=10), TensorSpec("dense", "float32", ("B", 3))]


def good_feeds(rows: int = 4) -> dict[str, np.ndarray]:
    return {"ids": np.arange(rows, dtype=np.int64), "dense": np.zeros((rows, 3), np.float32)}


def test_load_npz_returns_every_array(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, **good_feeds())
    arrays = load_npz(path)
    assert sorted(arrays) == ["dense", "ids"]
    assert arrays["ids"].tolist() == [0, 1, 2, 3]


def test_load_npz_missing_file_names_it(tmp_path):
    with pytest.raises(DcncError, match="nope.npz: no such file"):
        load_npz(tmp_path / "nope.npz")


def test_load_npz_corrupt_file(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"not a zip at all")
    with pytest.raises(DcncError, match="not a readable .npz"):
        load_npz(path)


def test_load_npz_refuses_pickled_arrays(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, ids=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DcncError, match="pickled"):
        load_npz(path)


def test_check_feeds_returns_the_shared_batch():
    assert check_feeds(good_feeds(5), SPECS, "d.npz") == 5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.pop("dense"), "missing input 'dense'"),
        (lambda f: f.update(extra=np.zeros(4)), "unexpected key 'extra'"),
        (lambda f: f.update(ids=f["ids"].astype(np.int32)), "'ids' has dtype int32, expected int64"),
        (lambda f: f.update(dense=np.zeros((4, 3, 1), np.float32)), "expected 2 dims"),
        (lambda f: f.update(dense=np.zeros((4, 5), np.float32)), "expected 3 at axis 1"),
        (lambda f: f.update(dense=np.zeros((3, 3), np.float32)), "'dense' has 3 rows, other inputs have 4"),
        (lambda f: f["dense"].__setitem__((1, 2), np.nan), "'dense' holds 1 NaN/Inf"),
        (lambda f: f["dense"].__setitem__((0, 0), np.inf), "'dense' holds 1 NaN/Inf"),
        (lambda f: f["ids"].__setitem__(0, 10), r"id 10, outside \[0, 10\)"),
        (lambda f: f["ids"].__setitem__(0, -1), "negative id -1"),
        (lambda f: f.update(ids=np.zeros(0, np.int64), dense=np.zeros((0, 3), np.float32)), "'ids' is empty"),
    ],
    ids=["missing", "extra", "dtype", "rank", "fixed-dim", "batch", "nan", "inf", "id-high", "id-negative", "empty"],
)
def test_check_feeds_names_what_is_wrong(change, message):
    feeds = good_feeds()
    change(feeds)
    with pytest.raises(DcncError, match=f"d.npz: .*{message}"):
        check_feeds(feeds, SPECS, "d.npz")
