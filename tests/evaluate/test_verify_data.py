"""Evaluation data for verify: the retrieval and ranking .npz formats and every way they can be wrong."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.core.errors import DcncError
from toolkit.core.signature import TensorSpec
from toolkit.evaluate.evaldata import NumericEval, RankingEval, RetrievalEval, load_eval

QUERY = [TensorSpec("user_id", "int64", ("B",), high=50), TensorSpec("profile", "float32", ("B", 3))]
ITEM = [TensorSpec("item_id", "int64", ("B",), high=100)]
RETRIEVAL_SPECS = {"query": QUERY, "item": ITEM}
RETRIEVAL_OUTPUTS = {"query": ["embedding"], "item": ["embedding"]}
RANKING_SPECS = {"ranker": [TensorSpec("x", "float32", ("B", 2))]}
RANKING_OUTPUTS = {"ranker": ["logit", "probability"]}


def retrieval_arrays(queries: int = 5, items: int = 20) -> dict[str, np.ndarray]:
    return {
        "query/user_id": np.arange(queries, dtype=np.int64),
        "query/profile": np.zeros((queries, 3), np.float32),
        "item/item_id": np.arange(items, dtype=np.int64),
        "relevance": np.array([[0, 3], [4, 19]], dtype=np.int64),
    }


def ranking_arrays(rows: int = 6) -> dict[str, np.ndarray]:
    return {"x": np.ones((rows, 2), np.float32), "label": (np.arange(rows) % 2).astype(np.float32)}


def save(tmp_path, arrays):
    path = tmp_path / "eval.npz"
    np.savez(path, **arrays)
    return path


def test_retrieval_file_splits_into_queries_items_and_relevance(tmp_path):
    data = load_eval(save(tmp_path, retrieval_arrays()), RETRIEVAL_SPECS, RETRIEVAL_OUTPUTS)
    assert isinstance(data, RetrievalEval)
    assert (data.num_queries, data.num_items) == (5, 20)
    assert sorted(data.queries) == ["profile", "user_id"] and list(data.items) == ["item_id"]
    assert data.relevance.tolist() == [[0, 3], [4, 19]]


def test_ranking_label_belongs_to_the_first_output(tmp_path):
    data = load_eval(save(tmp_path, ranking_arrays()), RANKING_SPECS, RANKING_OUTPUTS)
    assert isinstance(data, RankingEval)
    assert list(data.labels) == ["logit"] and data.labels["logit"].tolist() == [0, 1, 0, 1, 0, 1]


def test_named_labels_go_to_their_output(tmp_path):
    arrays = ranking_arrays()
    arrays["label/probability"] = arrays.pop("label")
    data = load_eval(save(tmp_path, arrays), RANKING_SPECS, RANKING_OUTPUTS)
    assert list(data.labels) == ["probability"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("relevance"), "--require-quality: the data has no 'relevance' pairs"),
        (lambda a: a.update(relevance=np.array([[0, 20]])), r"names item row 20, outside \[0, 20\)"),
        (lambda a: a.update(relevance=np.array([[-1, 0]])), "names query row -1"),
        (lambda a: a.update(relevance=np.array([0, 1])), r"expected \[P, 2\]"),
        (lambda a: a.update(relevance=np.array([[0.0, 1.0]])), "expected int64"),
        (lambda a: a.pop("query/profile"), "query: missing input 'profile'"),
        (lambda a: [a.pop(k) for k in ("item/item_id",)], "no 'item/<input>' keys"),
        (lambda a: a["query/profile"].__setitem__((0, 0), np.nan), "query: 'profile' holds 1 NaN"),
        (lambda a: a.update({"item/item_id": np.arange(100, 120)}), r"item: 'item_id' holds id 119, outside \[0, 100\)"),
        (lambda a: a.update(stray=np.zeros(2)), "unexpected key 'stray'"),
    ],
    ids=["no-relevance", "item-row", "query-row", "relevance-shape", "relevance-dtype", "missing-input",
         "no-item-keys", "nan", "id-range", "stray-key"],
)
def test_bad_retrieval_data_is_refused_naming_the_key(tmp_path, change, message):
    arrays = retrieval_arrays()
    change(arrays)
    with pytest.raises(DcncError, match=message):
        load_eval(save(tmp_path, arrays), RETRIEVAL_SPECS, RETRIEVAL_OUTPUTS, require_quality=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("label"), "--require-quality: the data has no 'label'"),
        (lambda a: a.update(label=np.array([0, 1, 2, 0, 1, 0], np.float32)), "must be 0 or 1"),
        (lambda a: a.update(label=np.ones(6, np.float32)), "AUC needs both classes"),
        (lambda a: a.update(label=np.array([0, 1], np.float32)), r"expected \[6\]"),
        (lambda a: a.update({"label/ctr": np.zeros(6)}), "'label/ctr' names no output"),
        (lambda a: a.update({"label/logit": a["label"]}), "given twice"),
        (lambda a: a["x"].__setitem__((2, 1), np.inf), "'x' holds 1 NaN/Inf"),
    ],
    ids=["no-label", "not-binary", "one-class", "length", "unknown-output", "twice", "inf"],
)
def test_bad_ranking_data_is_refused_naming_the_key(tmp_path, change, message):
    arrays = ranking_arrays()
    change(arrays)
    with pytest.raises(DcncError, match=message):
        load_eval(save(tmp_path, arrays), RANKING_SPECS, RANKING_OUTPUTS, require_quality=True)


def test_tower_inputs_alone_give_numeric_only_data_saying_why(tmp_path):
    arrays = retrieval_arrays()
    arrays.pop("relevance")
    data = load_eval(save(tmp_path, arrays), RETRIEVAL_SPECS, RETRIEVAL_OUTPUTS)
    assert isinstance(data, NumericEval) and sorted(data.feeds) == ["item", "query"]
    assert "no 'relevance' pairs" in data.why and len(data.feeds["item"]["item_id"]) == 20
    ranking = ranking_arrays()
    ranking.pop("label")
    data = load_eval(save(tmp_path, ranking), RANKING_SPECS, RANKING_OUTPUTS)
    assert isinstance(data, NumericEval) and list(data.feeds["ranker"]) == ["x"] and "no 'label'" in data.why


def test_towers_without_a_quality_metric_take_inputs_per_tower(tmp_path):
    specs = {"a": [TensorSpec("x", "float32", ("B", 2))], "b": [TensorSpec("y", "int64", ("B",), high=4)]}
    arrays = {"a/x": np.ones((3, 2), np.float32), "b/y": np.arange(5, dtype=np.int64) % 4}
    data = load_eval(save(tmp_path, arrays), specs, {"a": ["o"], "b": ["o"]})
    assert isinstance(data, NumericEval) and len(data.feeds["b"]["y"]) == 5
    with pytest.raises(DcncError, match="unexpected key 'z'"):
        load_eval(save(tmp_path, {**arrays, "z": np.zeros(2)}), specs, {"a": ["o"], "b": ["o"]})


def test_missing_eval_file_is_refused(tmp_path):
    with pytest.raises(DcncError, match="no such file"):
        load_eval(tmp_path / "none.npz", RANKING_SPECS, RANKING_OUTPUTS)
