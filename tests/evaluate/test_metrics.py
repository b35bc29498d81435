"""Quality and parity metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from toolkit.core.errors import DcncError
from toolkit.evaluate.metrics import (
    TopKSearch,
    agreement_at_k,
    auc,
    exact_top_k,
    logloss,
    recall_at_k,
)
from toolkit.evaluate.parity import ParityAccumulator


def chunks(items: np.ndarray, size: int):
    return (items[i : i + size] for i in range(0, len(items), size))


def test_top_k_over_chunks_equals_brute_force():
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((30, 8)).astype(np.float32)
    items = rng.standard_normal((500, 8)).astype(np.float32)
    # chunks of 7 are smaller than k = 10, so the best items of a query come from several chunks
    top = exact_top_k(queries, chunks(items, 7), k=10)
    expected = np.argsort(-(queries @ items.T), axis=1)[:, :10]
    assert (top.ids == expected).all()
    assert np.allclose(top.scores, np.take_along_axis(queries @ items.T, expected, 1), atol=1e-5)


def test_top_k_is_capped_at_the_corpus_size():
    top = exact_top_k(np.eye(2, dtype=np.float32), [np.array([[1, 0], [0, 1], [1, 1]], np.float32)], k=5)
    assert top.ids.shape == (2, 3)
    assert top.ids[0, 0] == 2 and top.ids[1, 0] == 2  # (1, 1) scores 1 for both queries, like the unit item


def test_top_k_refuses_a_dimension_mismatch_and_an_empty_corpus():
    search = TopKSearch(np.ones((2, 4), np.float32), 3)
    with pytest.raises(DcncError, match="queries have dim 4"):
        search.add(np.ones((5, 3), np.float32))
    with pytest.raises(DcncError, match="corpus is empty"):
        search.result()


def test_recall_at_k_by_hand():
    top = np.array([[5, 1, 2], [7, 8, 9], [0, 1, 2]])
    # query 0: relevant {1, 4} -> @1 0/2, @2 1/2, @3 1/2; query 1: relevant {9} -> @1 0, @3 1;
    # query 2 has no relevant items and is left out; the duplicate pair (1, 9) counts once.
    relevance = np.array([[0, 1], [0, 4], [1, 9], [1, 9]])
    recall = recall_at_k(top, relevance, [1, 2, 3])
    assert recall[1] == pytest.approx(0.0)
    assert recall[2] == pytest.approx((0.5 + 0.0) / 2)
    assert recall[3] == pytest.approx((0.5 + 1.0) / 2)


def test_recall_at_k_refuses_k_beyond_the_lists():
    with pytest.raises(DcncError, match="K must be in"):
        recall_at_k(np.zeros((1, 3), np.int64), np.array([[0, 0]]), [5])


def test_agreement_at_k_by_hand():
    a = np.array([[1, 2, 3], [4, 5, 6]])
    b = np.array([[2, 1, 9], [6, 7, 8]])
    agreement = agreement_at_k(a, b, [1, 2, 3])
    assert agreement[1] == pytest.approx(0.0)  # 1 vs 2, 4 vs 6
    assert agreement[2] == pytest.approx((2 / 2 + 0 / 2) / 2)  # {1,2}={2,1}; {4,5} vs {6,7}
    assert agreement[3] == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_auc_counts_ties_as_half():
    # positives score 0.8, 0.5; negatives 0.5, 0.1. Pairs: (0.8>0.5) 1, (0.8>0.1) 1, (0.5=0.5) 1/2, (0.5>0.1) 1
    assert auc(np.array([1, 1, 0, 0]), np.array([0.8, 0.5, 0.5, 0.1])) == pytest.approx(3.5 / 4)


def test_auc_of_a_perfect_and_a_reversed_ranking():
    labels = np.array([0, 0, 1, 1])
    assert auc(labels, np.array([1.0, 2.0, 3.0, 4.0])) == 1.0
    assert auc(labels, np.array([4.0, 3.0, 2.0, 1.0])) == 0.0


def test_auc_needs_both_classes():
    with pytest.raises(DcncError, match="both classes"):
        auc(np.ones(3), np.arange(3.0))


def test_logloss_from_logits_by_hand():
    # logit 0 -> p = 1/2 -> log 2 for either label; logit ln 3 -> p = 3/4 -> -log(3/4) for label 1
    assert logloss(np.array([1.0, 0.0, 1.0]), np.array([0.0, 0.0, math.log(3)])) == pytest.approx(
        (2 * math.log(2) - math.log(0.75)) / 3
    )


def test_logloss_stays_finite_where_the_sigmoid_saturates():
    assert logloss(np.array([0.0]), np.array([1000.0])) == pytest.approx(1000.0)


def test_parity_error_statistics_by_hand():
    reference = np.array([[3.0, 4.0], [1.0, 0.0]])
    candidate = np.array([[3.0, 4.0], [0.0, 1.0]])
    stats = ParityAccumulator.of(reference, candidate)
    assert stats["max_abs"] == 1.0
    assert stats["rel_l2"] == pytest.approx(math.sqrt(2) / math.sqrt(26))
    assert stats["cosine_min"] == pytest.approx(0.0)  # [1, 0] vs [0, 1]
    assert stats["cosine_mean"] == pytest.approx(0.5)


def test_parity_quantiles_are_upper_bounds_within_four_percent():
    errors = np.linspace(0.001, 0.1, 1000)
    stats = ParityAccumulator.of(np.zeros(1000), errors)
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        exact = np.quantile(errors, q, method="inverted_cdf")  # the smallest error with a share q at or below it
        assert exact <= stats["error_quantiles"][name] <= exact * 1.04


@pytest.mark.parametrize("shape", [(3,), (3, 1)])
def test_an_output_with_one_value_per_row_has_no_cosine_and_is_judged_by_its_error(shape):
    # a whole-batch cosine would read 1.0 here although every value is off by 100%
    stats = ParityAccumulator.of(np.array([1.0, 2.0, 3.0]).reshape(shape), np.array([2.0, 4.0, 6.0]).reshape(shape))
    assert stats["cosine_mean"] is None and stats["cosine_min"] is None
    assert stats["rel_l2"] == pytest.approx(1.0) and stats["max_abs"] == 3.0


def test_parity_counts_nan_and_inf_and_measures_the_rest():
    candidate = np.array([[1.0, np.nan], [np.inf, 2.5]])
    stats = ParityAccumulator.of(np.array([[1.0, 1.0], [1.0, 2.0]]), candidate)
    assert (stats["candidate_nan"], stats["candidate_inf"], stats["reference_nan"]) == (1, 1, 0)
    assert stats["max_abs"] == 0.5 and stats["elements"] == 2


def test_identical_outputs_have_zero_error_and_unit_cosine():
    x = np.random.default_rng(1).standard_normal((10, 4))
    stats = ParityAccumulator.of(x, x.copy())
    assert stats["max_abs"] == 0.0 and stats["rel_l2"] == 0.0 and stats["error_quantiles"]["p99"] == 0.0
    assert stats["cosine_min"] == pytest.approx(1.0)


def test_parity_histogram_counts_every_error_in_its_log_bin_and_trims_empty_ends():
    errors = np.array([0.0, 1e-13, 1.5e-3, 2e-3, 2e-3, 0.5])
    histogram = ParityAccumulator.of(np.zeros(6), errors)["histogram"]
    edges, counts = np.array(histogram["edges"]), np.array(histogram["counts"])
    assert histogram["at_or_below"] == {"value": 1e-12, "count": 2}  # the exact match and 1e-13
    assert counts.sum() == 4 and counts[0] > 0 and counts[-1] > 0
    assert len(edges) == len(counts) + 1 and np.all(np.diff(edges) > 0)
    for error in (1.5e-3, 2e-3, 0.5):  # each error lies in (edges[i], edges[i + 1]] of a bin holding it
        i = np.searchsorted(edges, error) - 1
        assert edges[i] < error <= edges[i + 1] * (1 + 1e-6) and counts[i] >= 1
    assert edges[0] > 1e-3 and edges[-1] < 0.52  # 1.5e-3 .. 0.5 spans 2.5 decades, not 18
