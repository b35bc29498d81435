"""Evaluation data for `dcnc verify`: loading and checking the retrieval and ranking .npz formats.

Retrieval (a two-tower model, towers "query" and "item"):
    query/<input>  one row per query, for each query-tower input
    item/<input>   the whole item corpus, for each item-tower input
    relevance      int64 [P, 2]: (query row, item row) pairs that count as hits for recall@K

Ranking (one tower):
    <input>        for each tower input
    label          0/1 labels [N] for the tower's first output (a logit)
    label/<output> 0/1 labels [N] for a named output (one per task of a multi-task tower)

Numeric only (any towers): the tower inputs alone, `<input>` for a one-tower model, `<tower>/<input>` for
several. Without relevance pairs or labels there is no quality metric to judge, so verify judges numeric
parity, the error statistics and latency, and its report says why quality is absent (unless the caller
requires quality: then such data is an error).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.core.errors import DcncError
from toolkit.core.npz import check_feeds, load_npz
from toolkit.core.signature import TensorSpec
from toolkit.evaluate.corpus import CorpusScan

RETRIEVAL_TOWERS = ("query", "item")


@dataclass
class RetrievalEval:
    """Query inputs, the item corpus, and the relevant (query row, item row) pairs."""

    queries: dict[str, np.ndarray]
    items: dict[str, np.ndarray]
    relevance: np.ndarray

    @property
    def num_queries(self) -> int:
        return len(next(iter(self.queries.values())))

    @property
    def num_items(self) -> int:
        return len(next(iter(self.items.values())))


@dataclass
class RankingEval:
    """Tower inputs and, per scored output, its 0/1 labels."""

    feeds: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.feeds.values())))


@dataclass
class NumericEval:
    """Tower inputs without labels or relevance pairs; `why` says what quality metric they cannot give."""

    feeds: dict[str, dict[str, np.ndarray]]  # tower -> input -> rows
    why: str


def is_retrieval(tower_names: list[str] | set[str]) -> bool:
    return set(tower_names) == set(RETRIEVAL_TOWERS)


def load_eval(
    path: str | Path,
    input_specs: dict[str, list[TensorSpec]],
    output_names: dict[str, list[str]],
    require_quality: bool = False,
) -> RetrievalEval | RankingEval | NumericEval:
    """Load and check evaluation data for a model whose towers have these inputs and outputs.

    input_specs / output_names: per tower name. Towers {"query", "item"} with `relevance` read the retrieval
    format, a single tower with labels the ranking format, tower inputs alone the numeric-only format (refused
    with `require_quality`). Any mismatch raises DcncError naming the file, the key and what is wrong.
    """
    arrays = load_npz(path)
    where = str(path)
    if is_retrieval(input_specs) and "relevance" in arrays:
        return retrieval_eval(arrays, input_specs, where)
    if len(input_specs) == 1 and any(k == "label" or k.startswith("label/") for k in arrays):
        (tower,) = input_specs
        return ranking_eval(arrays, input_specs[tower], output_names[tower], where)
    if is_retrieval(input_specs):
        why = "the data has no 'relevance' pairs (query row, item row), so recall@K and agreement@K are not measured"
    elif len(input_specs) == 1:
        why = "the data has no 'label', so AUC and log loss are not measured"
    else:
        why = f"towers {sorted(input_specs)} have no quality metric dcnc knows; numeric parity and latency only"
    if require_quality:
        raise DcncError(f"{where}: --require-quality: {why}")
    return numeric_eval(arrays, input_specs, where, why)


def numeric_eval(arrays: dict[str, np.ndarray], input_specs: dict[str, list[TensorSpec]], where: str,
                 why: str) -> NumericEval:  # fmt: skip
    """Split and check tower inputs: bare names for a one-tower model, `<tower>/<input>` for several."""
    if len(input_specs) == 1:
        (tower,) = input_specs
        check_feeds(arrays, input_specs[tower], where)
        return NumericEval({tower: arrays}, why)
    feeds = {}
    for tower, specs in input_specs.items():
        prefix = f"{tower}/"
        feeds[tower] = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        if not feeds[tower]:
            raise DcncError(f"{where}: no '{prefix}<input>' keys for the {tower} tower")
        check_feeds(feeds[tower], specs, f"{where}: {tower}")
    unknown = sorted(k for k in arrays if k.split("/", 1)[0] not in input_specs or "/" not in k)
    if unknown:
        raise DcncError(f"{where}: unexpected key {unknown[0]!r} (expected <tower>/<input> for towers {sorted(input_specs)})")
    return NumericEval(feeds, why)


def retrieval_eval(
    arrays: dict[str, np.ndarray], input_specs: dict[str, list[TensorSpec]], where: str
) -> RetrievalEval:
    """Split and check the retrieval format (see the module docstring)."""
    if "relevance" not in arrays:
        raise DcncError(f"{where}: missing key 'relevance' (int64 [P, 2] of query row, item row)")
    sides = {}
    for tower in RETRIEVAL_TOWERS:
        prefix = f"{tower}/"
        feeds = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        if not feeds:
            raise DcncError(f"{where}: no '{prefix}<input>' keys for the {tower} tower")
        sides[tower] = (feeds, check_feeds(feeds, input_specs[tower], f"{where}: {tower}"))
    unknown = sorted(k for k in arrays if k != "relevance" and not k.startswith(("query/", "item/")))
    if unknown:
        raise DcncError(f"{where}: unexpected key {unknown[0]!r} (expected query/<input>, item/<input>, relevance)")
    relevance = check_relevance(arrays["relevance"], sides["query"][1], sides["item"][1], where)
    return RetrievalEval(sides["query"][0], sides["item"][0], relevance)


@dataclass
class CorpusEval:
    """Queries, relevance naming corpus item ids, and the scan that runs the item towers over the corpus."""

    queries: dict[str, np.ndarray]
    relevance: np.ndarray  # int64 [P, 2]: (query row, item id in the corpus's id column)
    scan: CorpusScan
    corpus: str  # where the items come from, for the report

    @property
    def num_queries(self) -> int:
        return len(next(iter(self.queries.values())))

    @property
    def num_items(self) -> int:
        return self.scan.rows


def load_corpus_eval(
    path: str | Path, input_specs: dict[str, list[TensorSpec]], scan: CorpusScan, corpus: str
) -> CorpusEval:
    """Queries and relevance from the .npz at `path` (query/<input>, relevance as (query row, item id)) for a
    corpus read by `scan`, opened against the item tower's inputs. item/<input> arrays are not used: the corpus
    replaces them."""
    arrays = load_npz(path)
    if not is_retrieval(input_specs):
        raise DcncError(f"--corpus needs a retrieval model (towers {list(RETRIEVAL_TOWERS)}), got {list(input_specs)}")
    if "relevance" not in arrays:
        raise DcncError(f"{path}: missing key 'relevance' (int64 [P, 2] of query row, corpus item id)")
    queries = {k[len("query/"):]: v for k, v in arrays.items() if k.startswith("query/")}
    if not queries:
        raise DcncError(f"{path}: no 'query/<input>' keys for the query tower")
    num_queries = check_feeds(queries, input_specs["query"], f"{path}: query")
    scan.open(input_specs["item"])
    relevance = check_relevance(arrays["relevance"], num_queries, np.iinfo(np.int64).max, str(path))
    return CorpusEval(queries, relevance, scan, corpus)


def check_relevance(relevance: np.ndarray, num_queries: int, num_items: int, where: str) -> np.ndarray:
    """Relevance pairs must be integer [P, 2], P >= 1, rows inside the query and item tables."""
    if relevance.dtype.kind not in "iu":
        raise DcncError(f"{where}: 'relevance' has dtype {relevance.dtype}, expected int64")
    if relevance.ndim != 2 or relevance.shape[1] != 2 or len(relevance) == 0:
        raise DcncError(f"{where}: 'relevance' has shape {list(relevance.shape)}, expected [P, 2] with P >= 1")
    for column, (name, rows) in enumerate((("query", num_queries), ("item", num_items))):
        values = relevance[:, column]
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= rows:
            bad = low if low < 0 else high
            raise DcncError(f"{where}: 'relevance' names {name} row {bad}, outside [0, {rows})")
    return relevance.astype(np.int64)


def ranking_eval(
    arrays: dict[str, np.ndarray], specs: list[TensorSpec], output_names: list[str], where: str
) -> RankingEval:
    """Split and check the ranking format (see the module docstring)."""
    labels = {}
    for key in [k for k in arrays if k == "label" or k.startswith("label/")]:
        output = output_names[0] if key == "label" else key[len("label/"):]
        if output not in output_names:
            raise DcncError(f"{where}: {key!r} names no output of the tower (outputs: {output_names})")
        if output in labels:
            raise DcncError(f"{where}: labels for output {output!r} given twice ('label' and 'label/{output}')")
        labels[output] = arrays[key]
    if not labels:
        raise DcncError(f"{where}: missing key 'label' (0/1 labels [N] for output {output_names[0]!r})")
    feeds = {k: v for k, v in arrays.items() if not (k == "label" or k.startswith("label/"))}
    rows = check_feeds(feeds, specs, where)
    return RankingEval(feeds, {out: check_labels(y, rows, f"{where}: labels of {out!r}") for out, y in labels.items()})


def check_labels(labels: np.ndarray, rows: int, where: str) -> np.ndarray:
    """Labels are [rows] of 0/1 with both classes present (AUC is undefined otherwise)."""
    if labels.dtype.kind not in "fiub":
        raise DcncError(f"{where}: dtype {labels.dtype} is not numeric")
    if labels.shape != (rows,):
        raise DcncError(f"{where}: shape {list(labels.shape)}, expected [{rows}] (one per input row)")
    values = labels.astype(np.float64)
    if not np.isin(values, (0.0, 1.0)).all():
        raise DcncError(f"{where}: values must be 0 or 1 (found {values[~np.isin(values, (0.0, 1.0))][0]!r})")
    if values.min() == values.max():
        raise DcncError(f"{where}: all labels are {int(values[0])}; AUC needs both classes")
    return values.astype(np.float32)
