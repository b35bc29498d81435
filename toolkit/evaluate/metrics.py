"""Quality metrics: exact top-K, recall@K, agreement@K, AUC, log loss (elementwise parity: toolkit.evaluate.parity).

Everything that grows with the item corpus is streamed: exact top-K merges per-chunk faiss results into one
heap per query, so a 1M-item corpus never becomes an N x M score matrix in memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from toolkit.core.errors import DcncError


@dataclass
class TopK:
    """Per query, the K best item rows and their inner-product scores, best first."""

    scores: np.ndarray  # float32 [Q, K]
    ids: np.ndarray  # int64 [Q, K]


class TopKSearch:
    """Exact maximum-inner-product top-`k` of fixed queries over items added chunk by chunk.

    queries: float [Q, D]. Each `add(chunk)` (float [n_i, D], rows numbered on from the previous chunks) searches
    the chunk with a faiss IndexFlatIP (blocked BLAS: no Q x n_i score matrix is kept) and merges the hits into
    one heap per query, so memory stays O(Q*k + chunk) however large the corpus.
    """

    def __init__(self, queries: np.ndarray, k: int):
        import faiss

        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.queries.ndim != 2 or len(self.queries) == 0:
            raise DcncError(f"top-K: queries must be a non-empty [Q, D] matrix, got shape {list(self.queries.shape)}")
        if k < 1:
            raise DcncError(f"top-K: K must be >= 1, got {k}")
        self.k = k
        self.heap = faiss.ResultHeap(len(self.queries), k, keep_max=True)
        self.items = 0

    def add(self, chunk: np.ndarray, ids: np.ndarray | None = None) -> None:
        """Search one chunk. Its rows are numbered on from the previous chunks, or named by `ids` (int [n_i], e.g.
        a corpus's item ids, which need not be contiguous)."""
        import faiss

        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        if chunk.ndim != 2 or chunk.shape[1] != self.queries.shape[1]:
            raise DcncError(f"top-K: item chunk has shape {list(chunk.shape)}, queries have dim {self.queries.shape[1]}")
        if ids is not None and len(ids) != len(chunk):
            raise DcncError(f"top-K: {len(ids)} ids for an item chunk of {len(chunk)} rows")
        if len(chunk) == 0:
            return
        index = faiss.IndexFlatIP(chunk.shape[1])
        index.add(chunk)
        scores, rows = index.search(self.queries, min(self.k, len(chunk)))
        self.heap.add_result(scores, rows + self.items if ids is None else np.asarray(ids, dtype=np.int64)[rows])
        self.items += len(chunk)

    def result(self) -> TopK:
        """The best min(k, items seen) per query, best first (call once, after the last chunk)."""
        if self.items == 0:
            raise DcncError("top-K: the item corpus is empty")
        self.heap.finalize()
        kept = min(self.k, self.items)
        return TopK(self.heap.D[:, :kept].copy(), self.heap.I[:, :kept].copy())


def merge_top_k(parts: Iterable[TopK], k: int) -> TopK:
    """The best `k` per query of several top-K lists over disjoint item sets (shards) of the same queries: a k-way
    merge through one faiss heap per query, so memory is O(Q*k) whatever the number of shards."""
    import faiss

    heap, found = None, 0
    for part in parts:
        if heap is None:
            heap = faiss.ResultHeap(len(part.ids), k, keep_max=True)
        if part.ids.shape[1]:
            heap.add_result(part.scores, part.ids)
            found += part.ids.shape[1]
    if heap is None or found == 0:
        raise DcncError("top-K: the item corpus is empty")
    heap.finalize()
    kept = min(k, found)
    return TopK(heap.D[:, :kept].copy(), heap.I[:, :kept].copy())


def exact_top_k(queries: np.ndarray, item_chunks: Iterable[np.ndarray], k: int) -> TopK:
    """Exact top-`k` of each query over a corpus given as row-ordered chunks (see TopKSearch)."""
    search = TopKSearch(queries, k)
    for chunk in item_chunks:
        search.add(chunk)
    return search.result()


def _pair_keys(rows: np.ndarray, ids: np.ndarray, num_items: int) -> np.ndarray:
    """One int64 per (query row, item row) pair, so set operations over pairs are 1-D sorts."""
    return rows.astype(np.int64) * num_items + ids.astype(np.int64)


def recall_at_k(top_ids: np.ndarray, relevance: np.ndarray, ks: Iterable[int]) -> dict[int, float]:
    """Mean over queries with at least one relevant item of |top-k ∩ relevant| / |relevant| (recall_per_query)."""
    return {k: float(np.mean(values)) for k, values in recall_per_query(top_ids, relevance, ks).items()}


def recall_per_query(top_ids: np.ndarray, relevance: np.ndarray, ks: Iterable[int]) -> dict[int, np.ndarray]:
    """|top-k ∩ relevant| / |relevant| of each query with at least one relevant item, in query order.

    top_ids: int [Q, Kmax], best first. relevance: int [P, 2] of (query row, item row); duplicate pairs count
    once. Queries without relevant items are left out. Each k must be <= Kmax.
    """
    num_queries, k_max = top_ids.shape
    ks = sorted(set(ks))
    if not ks or ks[0] < 1 or ks[-1] > k_max:
        raise DcncError(f"recall@K: K must be in [1, {k_max}], got {ks}")
    num_items = int(max(top_ids.max(initial=0), relevance[:, 1].max(initial=0))) + 1
    relevant = np.unique(_pair_keys(relevance[:, 0], relevance[:, 1], num_items))
    query_of = relevant // num_items
    per_query = np.bincount(query_of, minlength=num_queries)
    judged = per_query > 0
    # Rank of each relevant pair in its query's list (k_max when absent), found by sorting the top-K pairs.
    top_keys = _pair_keys(np.repeat(np.arange(num_queries), k_max), top_ids.ravel(), num_items)
    order = np.argsort(top_keys, kind="stable")
    sorted_keys = top_keys[order]
    where = np.searchsorted(sorted_keys, relevant).clip(max=len(sorted_keys) - 1)
    found = sorted_keys[where] == relevant
    rank = np.where(found, order[where] % k_max, k_max)
    result = {}
    for k in ks:
        hits = np.bincount(query_of[rank < k], minlength=num_queries)
        result[k] = hits[judged] / per_query[judged]
    return result


def agreement_at_k(ids_a: np.ndarray, ids_b: np.ndarray, ks: Iterable[int]) -> dict[int, float]:
    """Mean over queries of |top-k of A ∩ top-k of B| / k: how far two retrievals return the same items."""
    if ids_a.shape != ids_b.shape:
        raise DcncError(f"agreement@K: top-K lists differ in shape {list(ids_a.shape)} vs {list(ids_b.shape)}")
    num_queries, k_max = ids_a.shape
    num_items = int(max(ids_a.max(initial=0), ids_b.max(initial=0))) + 1
    rows = np.arange(num_queries)[:, None]
    result = {}
    for k in sorted(set(ks)):
        if not 1 <= k <= k_max:
            raise DcncError(f"agreement@K: K must be in [1, {k_max}], got {k}")
        keys_a = _pair_keys(rows, ids_a[:, :k], num_items).ravel()
        keys_b = np.sort(_pair_keys(rows, ids_b[:, :k], num_items), axis=None)
        found = keys_b[np.searchsorted(keys_b, keys_a).clip(max=len(keys_b) - 1)] == keys_a
        result[k] = float(found.sum() / (num_queries * k))
    return result


def neighbour_agreement(reference: np.ndarray, candidate: np.ndarray, ks: Iterable[int]) -> dict[int, float]:
    """agreement@K of each row's nearest neighbours among the other rows (inner product), reference embeddings
    against candidate ones: how far a tower's own neighbourhoods survive a lowering, judged without labels or a
    partner tower. reference / candidate: float [N, D], the same N rows. A K above N - 1 is judged on all N - 1
    others (and reported under the K asked for)."""
    if reference.shape != candidate.shape or reference.ndim != 2 or len(reference) < 2:
        raise DcncError(f"neighbour agreement: needs two [N >= 2, D] embeddings of one shape, got "
                        f"{list(reference.shape)} and {list(candidate.shape)}")  # fmt: skip
    clipped = {k: min(k, len(reference) - 1) for k in ks}
    ks = sorted(set(clipped.values()))
    tops = []
    for side in (reference, candidate):
        side = side.astype(np.float64)
        scores = side @ side.T
        np.fill_diagonal(scores, -np.inf)  # a row is not its own neighbour
        tops.append(np.argsort(-scores, axis=1, kind="stable")[:, : ks[-1]])
    values = agreement_at_k(tops[0], tops[1], ks)
    return {k: values[c] for k, c in clipped.items()}


def pair_order_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Share of score pairs (i < j, reference scores not tied) that the candidate orders as the reference does:
    1 - the fraction of pairs whose order flips, a scoring tower's agreement without labels."""
    ref, cand = np.asarray(reference, np.float64).ravel(), np.asarray(candidate, np.float64).ravel()
    if ref.shape != cand.shape or len(ref) < 2:
        raise DcncError(f"pair order agreement: needs two score vectors of one length >= 2, got {ref.shape} and {cand.shape}")
    first, second = np.triu_indices(len(ref), 1)
    order_ref, order_cand = np.sign(ref[first] - ref[second]), np.sign(cand[first] - cand[second])
    untied = order_ref != 0
    return float(np.mean(order_ref[untied] == order_cand[untied])) if untied.any() else 1.0


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `values`, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0  # ranks starts+1 .. ends, averaged
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic; a tie between a positive and a negative counts 1/2."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives = labels == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        raise DcncError("AUC: labels need both classes")
    ranks = average_ranks(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy computed from logits: log(1 + e^z) - y z, exact even where sigmoid saturates."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    logits = np.asarray(logits, dtype=np.float64).ravel()
    return float(np.mean(np.logaddexp(0.0, logits) - labels * logits))
