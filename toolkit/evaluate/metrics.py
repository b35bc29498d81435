"""Parity and quality metrics: exact top-K, recall@K, agreement@K, AUC, log loss, elementwise output error.

Everything that grows with the item corpus is streamed: exact top-K merges per-chunk faiss results into one
heap per query, and output error accumulates per chunk, so a 1M-item corpus never becomes an N x M score
matrix or a full error array in memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.core.errors import DcncError

QUANTILES = (0.5, 0.9, 0.99, 0.999)
# Error quantiles come from a log-spaced histogram: BINS_PER_DECADE bins per factor of 10 between
# 10**LOG_LOW and 10**LOG_HIGH. A reported quantile is the upper edge of its bin: never below the exact
# value, at most 10**(1/64) - 1 = 3.7 % above it.
BINS_PER_DECADE = 64
LOG_LOW, LOG_HIGH = -12, 6


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

    def add(self, chunk: np.ndarray) -> None:
        import faiss

        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        if chunk.ndim != 2 or chunk.shape[1] != self.queries.shape[1]:
            raise DcncError(f"top-K: item chunk has shape {list(chunk.shape)}, queries have dim {self.queries.shape[1]}")
        if len(chunk) == 0:
            return
        index = faiss.IndexFlatIP(chunk.shape[1])
        index.add(chunk)
        scores, ids = index.search(self.queries, min(self.k, len(chunk)))
        self.heap.add_result(scores, ids + self.items)
        self.items += len(chunk)

    def result(self) -> TopK:
        """The best min(k, items seen) per query, best first (call once, after the last chunk)."""
        if self.items == 0:
            raise DcncError("top-K: the item corpus is empty")
        self.heap.finalize()
        kept = min(self.k, self.items)
        return TopK(self.heap.D[:, :kept].copy(), self.heap.I[:, :kept].copy())


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
    """Mean over queries with at least one relevant item of |top-k ∩ relevant| / |relevant|.

    top_ids: int [Q, Kmax], best first. relevance: int [P, 2] of (query row, item row); duplicate pairs count
    once. Queries without relevant items are left out of the mean. Each k must be <= Kmax.
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
        result[k] = float(np.mean(hits[judged] / per_query[judged]))
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
    partner tower. reference / candidate: float [N, D], the same N rows. K above N - 1 is clipped to N - 1."""
    if reference.shape != candidate.shape or reference.ndim != 2 or len(reference) < 2:
        raise DcncError(f"neighbour agreement: needs two [N >= 2, D] embeddings of one shape, got "
                        f"{list(reference.shape)} and {list(candidate.shape)}")  # fmt: skip
    ks = sorted({min(k, len(reference) - 1) for k in ks})
    tops = []
    for side in (reference, candidate):
        side = side.astype(np.float64)
        scores = side @ side.T
        np.fill_diagonal(scores, -np.inf)  # a row is not its own neighbour
        tops.append(np.argsort(-scores, axis=1, kind="stable")[:, : ks[-1]])
    return agreement_at_k(tops[0], tops[1], ks)


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


class ParityAccumulator:
    """Elementwise agreement of a candidate output with the reference, accumulated over batches.

    Reported: max_abs and quantiles of |candidate - reference|, rel_l2 = ||c - r|| / ||r||, cosine mean and min
    per sample (a sample's output flattened; a [B] output has one scalar per sample, so its cosine is taken over
    the whole vector), counts of NaN / Inf on each side, and the histogram of |c - r| (see `histogram`). Error
    statistics use positions where both sides are finite; the counts say how many were not.
    """

    def __init__(self) -> None:
        self.edges = 10.0 ** (np.arange(LOG_LOW * BINS_PER_DECADE, LOG_HIGH * BINS_PER_DECADE + 1) / BINS_PER_DECADE)
        # bins[0] holds errors <= edges[0] (reported as 0 when it is the quantile), bins[-1] those above edges[-1]
        self.bins = np.zeros(len(self.edges) + 1, dtype=np.int64)
        self.count = 0
        self.max_abs = 0.0
        self.sq_diff = 0.0
        self.sq_ref = 0.0
        self.cos_sum = 0.0
        self.cos_min = np.inf
        self.rows = 0
        self.dot = self.norm_ref = self.norm_cand = 0.0  # for [B] outputs: one cosine over all samples
        self.vector_output = False
        self.nonfinite = {"reference_nan": 0, "reference_inf": 0, "candidate_nan": 0, "candidate_inf": 0}

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        if reference.shape != candidate.shape:
            raise DcncError(f"parity: output shapes differ, reference {list(reference.shape)} vs candidate {list(candidate.shape)}")
        ref = reference.astype(np.float64)
        cand = candidate.astype(np.float64)
        for side, array in (("reference", ref), ("candidate", cand)):
            self.nonfinite[f"{side}_nan"] += int(np.isnan(array).sum())
            self.nonfinite[f"{side}_inf"] += int(np.isinf(array).sum())
        finite = np.isfinite(ref) & np.isfinite(cand)
        ref, cand = np.where(finite, ref, 0.0), np.where(finite, cand, 0.0)
        error = np.abs(cand - ref)[finite]
        if error.size:
            self.count += error.size
            self.max_abs = max(self.max_abs, float(error.max()))
            self.bins += np.bincount(np.searchsorted(self.edges, error), minlength=len(self.bins))
        self.sq_diff += float(np.sum((cand - ref) ** 2))
        self.sq_ref += float(np.sum(ref**2))
        if ref.ndim <= 1:
            self.vector_output = True
            self.dot += float(np.dot(ref.ravel(), cand.ravel()))
            self.norm_ref += float(np.sum(ref**2))
            self.norm_cand += float(np.sum(cand**2))
            return
        rows_ref, rows_cand = ref.reshape(len(ref), -1), cand.reshape(len(cand), -1)
        cosine = _cosine_rows(rows_ref, rows_cand)
        self.cos_sum += float(cosine.sum())
        self.cos_min = min(self.cos_min, float(cosine.min(initial=np.inf)))
        self.rows += len(cosine)

    def quantile(self, q: float) -> float:
        """Upper bound of the q-quantile of |c - r|, the smallest error with a share q of all errors at or below it
        (within 3.7 %; 0 when at or below 1e-12)."""
        if self.count == 0:
            return float("nan")
        bin_index = int(np.searchsorted(np.cumsum(self.bins), q * self.count))
        if bin_index == 0:
            return 0.0
        return float(self.edges[bin_index]) if bin_index < len(self.edges) else self.max_abs

    def histogram(self) -> dict[str, Any]:
        """The log-spaced counts of |c - r| behind the quantiles, for plotting: `counts[i]` errors lie in
        (`edges[i]`, `edges[i + 1]`] (edges to 6 significant digits, the last one max_abs when errors exceed
        10**LOG_HIGH); empty bins before the first and after the last non-empty one are left out. Errors at or
        below 10**LOG_LOW (exact matches included), which a log axis cannot show, are counted in `at_or_below`."""
        log_bins = np.flatnonzero(self.bins[1:]) + 1  # bins[j] holds (edges[j-1], edges[j]]; bins[-1] everything above
        histogram: dict[str, Any] = {"edges": [], "counts": [],
                                     "at_or_below": {"value": float(self.edges[0]), "count": int(self.bins[0])}}
        if log_bins.size:
            first, last = int(log_bins[0]), int(log_bins[-1])
            top = float(self.edges[last]) if last < len(self.edges) else self.max_abs
            edges = [*self.edges[first - 1 : last], top]
            histogram["edges"] = [float(f"{e:.6g}") for e in edges]
            histogram["counts"] = self.bins[first : last + 1].tolist()
        return histogram

    def result(self) -> dict[str, Any]:
        if self.vector_output:
            cos = _cosine(self.dot, self.norm_ref, self.norm_cand)
            cos_mean = cos_min = cos
        else:
            cos_mean = self.cos_sum / self.rows if self.rows else float("nan")
            cos_min = self.cos_min if self.rows else float("nan")
        return {
            "max_abs": self.max_abs if self.count else float("nan"),
            "rel_l2": float(np.sqrt(self.sq_diff) / np.sqrt(self.sq_ref)) if self.sq_ref > 0 else float(np.sqrt(self.sq_diff)),
            "cosine_mean": float(cos_mean),
            "cosine_min": float(cos_min),
            "error_quantiles": {f"p{100 * q:g}": self.quantile(q) for q in QUANTILES},
            "elements": self.count,
            **self.nonfinite,
            "histogram": self.histogram(),
        }


def _cosine(dot: float, sq_a: float, sq_b: float) -> float:
    if sq_a == 0.0 and sq_b == 0.0:
        return 1.0  # two zero vectors agree exactly
    if sq_a == 0.0 or sq_b == 0.0:
        return 0.0
    return dot / np.sqrt(sq_a * sq_b)


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    dot = np.einsum("ij,ij->i", a, b)
    sq_a, sq_b = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b)
    both_zero = (sq_a == 0) & (sq_b == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = dot / np.sqrt(sq_a * sq_b)
    return np.where(both_zero, 1.0, np.nan_to_num(cosine, nan=0.0))


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """Parity statistics of one output in one call (see ParityAccumulator)."""
    accumulator = ParityAccumulator()
    accumulator.update(reference, candidate)
    return accumulator.result()
