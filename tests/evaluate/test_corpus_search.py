"""Corpus-scale search: per-shard exact top-K merged k-way equals one exact search; workers' partials merge."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.core.errors import DcncError
from toolkit.evaluate.corpus import CorpusSearch, dense_codes, merge_partials
from toolkit.evaluate.metrics import TopKSearch, exact_top_k, merge_top_k, recall_at_k
from toolkit.evaluate.parity import ParityAccumulator


def unit_rows(rng: np.random.Generator, rows: int, dim: int = 16) -> np.ndarray:
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    items = unit_rows(rng, 20_000)
    ids = rng.permutation(len(items)).astype(np.int64) * 7919 + 2**40  # unique, sparse and large, as catalogue ids are
    return unit_rows(rng, 50), items, ids


def test_sharded_top_k_equals_one_exact_search(corpus):
    queries, items, ids = corpus
    k = 300
    whole = exact_top_k(queries, [items], k)
    cuts = [0, 7, 4000, 4001, 13_000, len(items)]  # uneven shards, one smaller than k
    parts = []
    for start, stop in zip(cuts[:-1], cuts[1:]):
        search = TopKSearch(queries, k)
        search.add(items[start:stop], ids[start:stop])
        parts.append(search.result())
    merged = merge_top_k(parts, k)
    np.testing.assert_array_equal(merged.ids, ids[whole.ids])
    np.testing.assert_array_equal(merged.scores, whole.scores)


def test_merge_of_shards_smaller_than_k_keeps_every_item():
    rng = np.random.default_rng(1)
    queries, items = unit_rows(rng, 3), unit_rows(rng, 10)
    parts = []
    for start in (0, 4):
        search = TopKSearch(queries, 50)
        search.add(items[start : start + (4 if start == 0 else 6)], np.arange(start, start + (4 if start == 0 else 6)))
        parts.append(search.result())
    merged = merge_top_k(parts, 50)
    assert merged.ids.shape == (3, 10)
    np.testing.assert_array_equal(merged.ids, exact_top_k(queries, [items], 10).ids)


def test_merge_of_nothing_is_an_empty_corpus():
    empty = TopKSearch(np.ones((2, 4), np.float32), 5)
    with pytest.raises(DcncError, match="corpus is empty"):
        merge_top_k([], 5)
    with pytest.raises(DcncError, match="corpus is empty"):
        empty.result()


def test_ids_must_match_the_chunk():
    search = TopKSearch(np.ones((2, 4), np.float32), 5)
    with pytest.raises(DcncError, match="3 ids for an item chunk of 2 rows"):
        search.add(np.ones((2, 4), np.float32), np.arange(3))


def test_workers_partials_merge_to_the_single_worker_answer(corpus):
    queries, items, ids = corpus
    rng = np.random.default_rng(2)
    candidate_items = items + rng.normal(0, 1e-3, items.shape).astype(np.float32)
    sides = {"reference": queries, "candidate": queries}
    relevant = np.sort(ids[[5, 17, 19_999]])
    relevant = np.append(relevant, relevant.max() + 1)  # an id the corpus does not hold

    def worker(bounds):
        search = CorpusSearch(sides, 100, ["embedding"], relevant)
        for start, stop in bounds:
            search.add(ids[start:stop], {"embedding": items[start:stop]}, {"embedding": candidate_items[start:stop]})
        return search.partial()

    one = worker([(0, len(items))])
    merged = merge_partials([worker([(0, 5000), (5000, 9000)]), worker([]), worker([(9000, len(items))])], 100)
    for side in ("reference", "candidate"):
        np.testing.assert_array_equal(merged.top[side].ids, one.top[side].ids)
    assert merged.rows == one.rows == len(items)
    assert merged.relevant_seen.tolist() == [True, True, True, False]
    whole, parts = one.parity["embedding"].result(), merged.parity["embedding"].result()
    assert parts["max_abs"] == whole["max_abs"] and parts["histogram"] == whole["histogram"]
    assert parts["cosine_min"] == whole["cosine_min"]
    assert parts["cosine_mean"] == pytest.approx(whole["cosine_mean"], rel=1e-12)
    assert parts["rel_l2"] == pytest.approx(whole["rel_l2"], rel=1e-12)


def test_merging_only_empty_workers_is_an_empty_corpus():
    search = CorpusSearch({"reference": np.ones((2, 4), np.float32), "candidate": np.ones((2, 4), np.float32)},
                          5, ["embedding"], np.array([1]))  # fmt: skip
    with pytest.raises(DcncError, match="corpus is empty"):
        merge_partials([search.partial()], 5)


def test_parity_merge_of_scalar_outputs_equals_one_accumulator():
    rng = np.random.default_rng(3)
    reference, candidate = rng.standard_normal(100), rng.standard_normal(100)
    whole, first, second = ParityAccumulator(), ParityAccumulator(), ParityAccumulator()
    whole.update(reference, candidate)
    first.update(reference[:30], candidate[:30])
    second.update(reference[30:], candidate[30:])
    first.merge(second)
    merged, one = first.result(), whole.result()
    assert merged["rel_l2"] == pytest.approx(one["rel_l2"], rel=1e-12) and merged["max_abs"] == one["max_abs"]
    assert merged["cosine_mean"] is None is one["cosine_mean"]  # one value per row: no cosine


def test_dense_codes_leave_recall_unchanged():
    rng = np.random.default_rng(4)
    top_ids = rng.permutation(120).reshape(6, 20).astype(np.int64) * 2**40 + 3
    relevance = np.stack([np.arange(6), top_ids[np.arange(6), rng.integers(0, 20, 6)]], axis=1)
    relevance = np.vstack([relevance, [[0, 5]]])  # relevant but never retrieved
    from toolkit.evaluate.metrics import TopK

    codes, top = dense_codes(relevance, {"reference": TopK(np.zeros((6, 20), np.float32), top_ids)})
    recall = recall_at_k(top["reference"], codes, (1, 20))
    assert recall[20] == pytest.approx((5 * 1.0 + 0.5) / 6)
