"""Held-out metrics on the eval formats of toolkit.data.evalsplit: recall@K over a corpus, ROC AUC, log loss."""

from __future__ import annotations

import numpy as np


def recall_at_k(ranked: np.ndarray, relevance: np.ndarray, k: int) -> float:
    """Mean over queries that have relevant items of |top-k ∩ relevant| / |relevant|.

    ranked: int [Q, >= k] item rows per query, best first. relevance: int [P, 2] (query row, item row) pairs.
    """
    if ranked.shape[1] < k:
        raise ValueError(f"recall@{k} needs at least {k} ranked items per query, got {ranked.shape[1]}")
    queries, items = relevance[:, 0], relevance[:, 1]
    found = (ranked[queries, :k] == items[:, None]).any(axis=1)
    relevant = np.bincount(queries, minlength=len(ranked))
    hits = np.bincount(queries, weights=found, minlength=len(ranked))
    judged = relevant > 0
    return float((hits[judged] / relevant[judged]).mean())


def roc_auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve: the chance a random positive outscores a random negative (ties count half)."""
    label = np.asarray(label) > 0.5
    positives, negatives = int(label.sum()), int((~label).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("AUC needs both positive and negative labels")
    order = np.argsort(score, kind="mergesort")
    _, first, counts = np.unique(np.asarray(score)[order], return_index=True, return_counts=True)
    mean_rank = first + (counts + 1) / 2.0  # 1-based average rank of each group of tied scores
    ranks = np.empty(len(order))
    ranks[order] = np.repeat(mean_rank, counts)
    return float((ranks[label].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def log_loss(probability: np.ndarray, label: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities against 0/1 labels (clipped to [eps, 1 - eps])."""
    p = np.clip(np.asarray(probability, np.float64), eps, 1.0 - eps)
    y = np.asarray(label, np.float64)
    return float(-(y * np.log(p) + (1.0 - y) * np.log1p(-p)).mean())
