"""Recall parity over an item corpus too large to hold: per-shard exact top-K and item parity, merged across workers.

A worker (one process, or one Ray actor) feeds CorpusSearch the items it is given: item ids with both sides'
tower outputs. Each shard (`chunk` items) is searched exactly (faiss, inner product) and folded into one heap per
query and side, so a worker holds O(Q*K + shard) whatever the corpus size, never an N x M score matrix. A worker's CorpusPartial
is small (the K best per query, the parity sums) and partials merge k-way into the answer for the whole corpus.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from toolkit.core.errors import DcncError
from toolkit.evaluate.metrics import TopK, TopKSearch, merge_top_k
from toolkit.evaluate.parity import ParityAccumulator

SIDES = ("reference", "candidate")


@dataclass
class CorpusPartial:
    """What one worker found: per side the K best item ids per query, item-output parity, the rows it saw, and
    which of the relevant item ids occurred among them."""

    top: dict[str, TopK]
    parity: dict[str, ParityAccumulator]
    rows: int
    relevant_seen: np.ndarray  # bool, one per entry of the sorted relevant ids


class CorpusSearch:
    """Both sides' exact top-`k` over item shards, with item parity.

    queries: per side the query embeddings float [Q, D]. outputs: the item tower's output names, the first being
    the embedding searched. relevant_ids: the item ids relevance names (sorted, unique), to tell which the corpus
    holds.
    """

    def __init__(
        self, queries: dict[str, np.ndarray], k: int, outputs: list[str], relevant_ids: np.ndarray, chunk: int = 65536
    ):  # fmt: skip
        self.searches = {side: TopKSearch(queries[side], k) for side in SIDES}
        self.outputs = outputs
        self.parity = {name: ParityAccumulator() for name in outputs}
        self.relevant_ids = relevant_ids
        self.relevant_seen = np.zeros(len(relevant_ids), dtype=bool)
        self.rows = 0
        self.chunk = chunk
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, ids: np.ndarray, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> None:
        """Items as they come (int64 ids [n], each side's outputs for them): parity now, the search once `chunk`
        rows are pending (a faiss search per inference batch would spend its time keeping K-heaps, not in BLAS)."""
        for name in self.outputs:
            self.parity[name].update(reference[name], candidate[name])
        embedding = self.outputs[0]
        self.pending.append((ids, reference[embedding], candidate[embedding]))
        self.relevant_seen |= np.isin(self.relevant_ids, ids)
        self.rows += len(ids)
        if sum(len(p[0]) for p in self.pending) >= self.chunk:
            self._search()

    def _search(self) -> None:
        if self.pending:
            ids, reference, candidate = (np.concatenate(part) for part in zip(*self.pending))
            self.searches["reference"].add(reference, ids)
            self.searches["candidate"].add(candidate, ids)
            self.pending = []

    def partial(self) -> CorpusPartial:
        """This worker's share (call once, after its last shard); a worker that got no rows has empty lists."""
        self._search()
        if self.rows:
            top = {side: search.result() for side, search in self.searches.items()}
        else:
            queries = len(self.searches["reference"].queries)
            empty = TopK(np.zeros((queries, 0), np.float32), np.zeros((queries, 0), np.int64))
            top = dict.fromkeys(SIDES, empty)
        return CorpusPartial(top, self.parity, self.rows, self.relevant_seen)


@dataclass
class SearchSpec:
    """What a worker needs to start its own CorpusSearch; plain arrays, so it travels to Ray actors."""

    queries: dict[str, np.ndarray]
    k: int
    outputs: list[str]
    relevant_ids: np.ndarray

    def new(self) -> CorpusSearch:
        return CorpusSearch(self.queries, self.k, self.outputs, self.relevant_ids)


class CorpusScan(Protocol):
    """The item towers over a corpus read shard by shard (toolkit.commands.embed has a local and a Ray scan).

    open: check the corpus against the item tower's inputs; `rows` is then its size. sample: the first items'
    inputs (latency is timed on them). Calling it runs both sides over every item, searches each shard with a
    fresh CorpusSearch from `search` and returns the merged CorpusPartial. A scan may run the given runners in
    this process, or open its own in workers elsewhere.
    """

    rows: int
    label: str  # where the items come from and how they are run, for the report

    def open(self, specs: list[Any]) -> None: ...

    def sample(self, rows: int) -> dict[str, np.ndarray]: ...

    def __call__(self, reference: Any, candidate: Any, search: SearchSpec) -> CorpusPartial: ...


def merge_partials(parts: Iterable[CorpusPartial], k: int) -> CorpusPartial:
    """The whole corpus from its workers' partials: top-K merged k-way per side, parity and counts summed."""
    parts = list(parts)
    if not parts or sum(p.rows for p in parts) == 0:
        raise DcncError("the item corpus is empty")
    top = {side: merge_top_k((p.top[side] for p in parts), k) for side in SIDES}
    parity = {name: ParityAccumulator() for name in parts[0].parity}
    for part in parts:
        for name, accumulator in part.parity.items():
            parity[name].merge(accumulator)
    seen = np.logical_or.reduce([p.relevant_seen for p in parts])
    return CorpusPartial(top, parity, sum(p.rows for p in parts), seen)


def dense_codes(relevance: np.ndarray, top: dict[str, TopK]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Relevance pairs and top-K lists with item ids renumbered 0..n-1 over the ids they mention, so recall@K's
    (query, item) pair keys stay small whatever the corpus's ids (hashes, sparse ranges)."""
    named = np.concatenate([relevance[:, 1], *(t.ids.ravel() for t in top.values())])
    _, codes = np.unique(named, return_inverse=True)
    relevance_codes = np.stack([relevance[:, 0], codes[: len(relevance)]], axis=1)
    out, start = {}, len(relevance)
    for side, t in top.items():
        out[side] = codes[start : start + t.ids.size].reshape(t.ids.shape)
        start += t.ids.size
    return relevance_codes, out
