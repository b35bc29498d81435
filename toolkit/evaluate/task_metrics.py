"""The metric a tower exists for, as a function of (reference outputs, candidate outputs) -> float: what the
INT8 sensitivity search (calibration.sensitivity) keeps as a ratio of FP32's. Retrieval: recall@K against
relevant pairs, or agreement@K of top-K neighbours where there are none; ranking: AUC; else mean cosine."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from toolkit.core.errors import DcncError
from toolkit.evaluate.metrics import (
    agreement_at_k,
    auc,
    exact_top_k,
    neighbour_agreement,
    pair_order_agreement,
    recall_at_k,
)

Metric = Callable[[np.ndarray, np.ndarray], float]


def agreement_metric(k: int = 100, corpus: np.ndarray | None = None) -> Metric:
    """agreement@K of exact inner-product top-K lists: each output row is a query, searched in `corpus` (e.g.
    the FP32 item embeddings, for a query tower) or, without one, in the outputs themselves (reference rows
    for the reference, candidate rows for the candidate), so an item tower is judged by its own neighbourhoods."""
    def metric(reference: np.ndarray, candidate: np.ndarray) -> float:
        ref_corpus = reference if corpus is None else corpus
        cand_corpus = candidate if corpus is None else corpus
        top = min(k, len(ref_corpus))
        ids_ref = exact_top_k(reference, [ref_corpus], top).ids
        ids_cand = exact_top_k(candidate, [cand_corpus], top).ids
        return agreement_at_k(ids_ref, ids_cand, [top])[top]

    return metric


def recall_metric(k: int, relevance: np.ndarray, partner: np.ndarray, side: str) -> Metric:
    """recall@K of a two-tower retrieval with one tower's outputs replaced by the candidate's: `side` "query"
    searches the candidate's rows in the `partner` item embeddings (FP32), "item" searches the FP32 `partner`
    queries in the candidate's rows. relevance: int [P, 2] (query row, item row)."""
    if side not in ("query", "item"):
        raise DcncError(f"recall metric: side must be query or item, got {side!r}")

    def metric(reference: np.ndarray, candidate: np.ndarray) -> float:
        queries, items = (candidate, partner) if side == "query" else (partner, candidate)
        top = min(k, len(items))
        return recall_at_k(exact_top_k(queries, [items], top).ids, relevance, [top])[top]

    return metric


def auc_metric(labels: np.ndarray) -> Metric:
    """AUC of the candidate's first output (a logit or probability) against 0/1 `labels`."""
    return lambda reference, candidate: auc(labels, candidate.ravel())


def cosine_metric(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean cosine similarity of the rows of the two outputs (flattened per row)."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    cand = candidate.reshape(len(candidate), -1).astype(np.float64)
    dots = np.sum(ref * cand, axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    return float(np.mean(np.divide(dots, norms, out=np.ones_like(dots), where=norms > 0)))


AgreementMetric = Callable[[np.ndarray, np.ndarray], dict[str, float]]


def held_out_metric(output_shape: list) -> tuple[AgreementMetric, str]:
    """What an INT8 build judges a tower by on held-out calibration rows, without labels: (metric, the key its
    target applies to). An embedding tower ([B, D], D > 1): agreement@10 and @100 of each row's nearest
    neighbours among the others; a scoring tower ([B] or [B, 1]): the share of score pairs in the same order."""
    if len(output_shape) == 2 and output_shape[1] != 1:
        return (lambda ref, cand: {f"agreement@{k}": v for k, v in neighbour_agreement(ref, cand, (10, 100)).items()},
                "agreement@100")  # fmt: skip
    return (lambda ref, cand: {"pair agreement": pair_order_agreement(ref, cand)}), "pair agreement"
