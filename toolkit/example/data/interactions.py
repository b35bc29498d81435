"""The container every example dataset reader returns: two feature tables and the rated interactions between them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from toolkit.core.errors import DcncError


@dataclass
class Interactions:
    """Users, items and the (user, item, rating, timestamp) events between them; row u of a user feature is user u."""

    name: str
    user_features: dict[str, np.ndarray]
    item_features: dict[str, np.ndarray]
    user: np.ndarray  # int64 [E], row in the user table
    item: np.ndarray  # int64 [E], row in the item table
    rating: np.ndarray  # float32 [E], 1..5
    timestamp: np.ndarray  # int64 [E]
    cardinalities: dict[str, int]  # every sparse (int64) feature: ids in [0, cardinality)
    # The generator's true latent factors (synthetic data only), for model-free checks of the structure.
    latent: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_users(self) -> int:
        return len(self.user_features["user_id"])

    @property
    def num_items(self) -> int:
        return len(self.item_features["item_id"])

    @property
    def num_interactions(self) -> int:
        return len(self.user)

    def check(self) -> Interactions:
        """Raise DcncError if any array is mis-shaped, non-finite or has an id outside its cardinality."""
        events = len(self.user)
        for what, array in (("item", self.item), ("rating", self.rating), ("timestamp", self.timestamp)):
            if len(array) != events:
                raise DcncError(f"dataset {self.name}: {what} has {len(array)} rows, user has {events}")
        if events == 0:
            raise DcncError(f"dataset {self.name}: no interactions")
        tables = (("user", self.user_features, self.num_users), ("item", self.item_features, self.num_items))
        for side, table, rows in tables:
            for name, array in table.items():
                if len(array) != rows:
                    raise DcncError(f"dataset {self.name}: {side} feature {name!r} has {len(array)} rows, not {rows}")
                if array.dtype == np.int64:
                    high = self.cardinalities.get(name)
                    if high is None or array.min() < 0 or array.max() >= high:
                        raise DcncError(f"dataset {self.name}: {side} feature {name!r} has ids outside [0, {high})")
                elif array.dtype != np.float32 or array.ndim != 2 or not np.isfinite(array).all():
                    raise DcncError(f"dataset {self.name}: {side} feature {name!r} must be finite float32 [rows, dim]")
        if self.user.min() < 0 or self.user.max() >= self.num_users:
            raise DcncError(f"dataset {self.name}: an interaction names a user outside the user table")
        if self.item.min() < 0 or self.item.max() >= self.num_items:
            raise DcncError(f"dataset {self.name}: an interaction names an item outside the item table")
        if not np.isfinite(self.rating).all() or self.rating.min() < 1 or self.rating.max() > 5:
            raise DcncError(f"dataset {self.name}: ratings must lie in [1, 5]")
        return self

    def fingerprint(self) -> str:
        """A short hash of every array: two loads of the same data give the same fingerprint."""
        import hashlib

        digest = hashlib.sha256(self.name.encode())
        for table in (self.user_features, self.item_features):
            for name in sorted(table):
                digest.update(name.encode())
                digest.update(np.ascontiguousarray(table[name]).tobytes())
        for array in (self.user, self.item, self.rating, self.timestamp):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]
