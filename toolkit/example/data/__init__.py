"""Datasets for the example trainer: the Interactions container every reader returns, and load_dataset by name.

A dataset is two feature tables (one row per user, one row per item) and the rated interactions between them.
Feature names are shared by every dataset, so one example spec fits all of them:

- user table: `user_id`, `user_age`, `user_occupation` (int64 ids), `user_profile` (float32 [U, d])
- item table: `item_id`, `item_genre` (int64 ids), `item_profile` (float32 [I, d])

Cardinalities and dense widths differ per dataset; `Interactions.cardinalities` and the arrays' widths are what
`toolkit.example.train.fit_spec_to_data` writes into a spec before training.
"""

from __future__ import annotations

from pathlib import Path

from toolkit.core.errors import DcncError
from toolkit.example.data.interactions import Interactions

DATASETS = ("synthetic", "movielens")


def load_dataset(name: str, data_dir: str | Path | None = None, seed: int = 0) -> Interactions:
    """`synthetic` (generated from `seed`; takes no data_dir) or `movielens` (MovieLens-100K from `data_dir`, or
    from the copy inside the recbole package when data_dir is None)."""
    if name == "synthetic":
        if data_dir is not None:
            raise DcncError("--data-dir applies to --dataset movielens; the synthetic dataset is generated from --seed")
        from toolkit.example.data.synthetic import generate

        return generate(seed=seed)
    if name == "movielens":
        from toolkit.example.data.movielens import load_movielens

        return load_movielens(data_dir)
    raise DcncError(f"dataset must be one of {list(DATASETS)}, got {name!r}")
