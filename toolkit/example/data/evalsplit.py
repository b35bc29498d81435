"""Held-out evaluation split and the `.npz` files built from it: retrieval eval, ranking eval, calibration samples.

File formats (np.savez, no pickles; other stages read them, so they are fixed):
- retrieval eval: `query/<input>` one row per eval query (a user with held-out interactions), `item/<input>` the
  whole item corpus (row = item), `relevance` int64 [P, 2] of (query row, item row) held-out pairs. Every held-out
  interaction counts as relevant (implicit feedback); items the user saw in training are not filtered out.
- ranking eval: `<input>` for each ranker input, one row per held-out interaction, and `label` float32 [N], 1 where
  the rating is >= 4.
- calibration sample: `<input>` for each input of one tower, rows drawn from training interactions.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.core.errors import DcncError
from toolkit.core.fileio import atomic_write_bytes
from toolkit.example.data.interactions import Interactions

POSITIVE_RATING = 4.0  # ranking label: rating >= 4 is a positive


@dataclass
class Split:
    """Interaction indices for training and for held-out evaluation (disjoint, together all interactions)."""

    train: np.ndarray
    held_out: np.ndarray


def split_interactions(data: Interactions, eval_fraction: float = 0.2, seed: int = 0) -> Split:
    """A seeded random split of the interactions; `eval_fraction` of them are held out."""
    if not 0.0 < eval_fraction < 1.0:
        raise DcncError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
    order = np.random.default_rng(seed).permutation(data.num_interactions)
    held = max(1, int(round(eval_fraction * data.num_interactions)))
    return Split(train=np.sort(order[held:]), held_out=np.sort(order[:held]))


def labels(data: Interactions, events: np.ndarray) -> np.ndarray:
    """Ranking labels of the given interactions: float32 1.0 where rating >= 4, else 0.0."""
    return (data.rating[events] >= POSITIVE_RATING).astype(np.float32)


def event_inputs(data: Interactions, events: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Each named feature, one row per interaction: user features from its user, item features from its item."""
    arrays = {}
    for name in names:
        if name in data.user_features:
            arrays[name] = data.user_features[name][data.user[events]]
        elif name in data.item_features:
            arrays[name] = data.item_features[name][data.item[events]]
        else:
            raise DcncError(f"dataset {data.name} has no feature {name!r}")
    return arrays


def retrieval_eval(data: Interactions, held_out: np.ndarray, query_inputs: list[str], item_inputs: list[str]) -> dict:
    """The retrieval eval arrays: eval queries, the item corpus and the (query row, item row) relevance pairs."""
    query_users = np.unique(data.user[held_out])
    arrays = {f"query/{n}": _table(data.user_features, n, data.name)[query_users] for n in query_inputs}
    arrays |= {f"item/{n}": _table(data.item_features, n, data.name) for n in item_inputs}
    pairs = np.stack([np.searchsorted(query_users, data.user[held_out]), data.item[held_out]], axis=1)
    arrays["relevance"] = np.unique(pairs, axis=0).astype(np.int64)
    return arrays


def ranking_eval(data: Interactions, held_out: np.ndarray, inputs: list[str]) -> dict[str, np.ndarray]:
    """The ranking eval arrays: the ranker's inputs for each held-out interaction and its 0/1 label."""
    return event_inputs(data, held_out, inputs) | {"label": labels(data, held_out)}


def calibration_sample(
    data: Interactions, train: np.ndarray, inputs: list[str], rows: int = 2048, seed: int = 0
) -> dict[str, np.ndarray]:
    """`rows` training interactions drawn without replacement (all of them if fewer), as one tower's inputs.
    Drawing interactions, not table rows, gives popular items their real share, as in serving traffic."""
    rng = np.random.default_rng(seed)
    events = np.sort(rng.choice(train, size=min(rows, len(train)), replace=False))
    return event_inputs(data, events, inputs)


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` as an uncompressed .npz atomically; refuses object arrays so the file never needs pickle."""
    for name, array in arrays.items():
        if array.dtype == object:
            raise DcncError(f"{path}: array {name!r} has dtype object, which .npz can only store as a pickle")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _table(table: dict[str, np.ndarray], name: str, dataset: str) -> np.ndarray:
    if name not in table:
        raise DcncError(f"dataset {dataset} has no feature {name!r} on this side (it has {sorted(table)})")
    return table[name]
