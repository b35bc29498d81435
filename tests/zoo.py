"""Tiny model specs for every cross kind x structure x family, shared by the tests of every package.

The models are small enough to build and run in well under a second (exporting one takes the torch exporter
4-6 s), and wide enough that every branch (cross, deep, head, sequence projection) holds real arithmetic.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from toolkit.model.spec import (
    FAMILIES,
    STRUCTURES,
    CrossSpec,
    DenseFeature,
    ModelSpec,
    SequenceSpec,
    SparseFeature,
    TowerSpec,
)
from toolkit.model.zoo.cross import CROSS_KINDS
from toolkit.model.zoo.families import build_model

# Every (family, cross kind, structure) the toolkit ships.
GRID = list(itertools.product(FAMILIES, CROSS_KINDS, STRUCTURES))
# Every cross kind x structure once, the family rotating so that each family also meets every kind and every
# structure: all pairs of the three options in 16 towers instead of 48, for the tests that export (the torch
# exporter takes 4-6 s a tower however small).
PAIRWISE = [(FAMILIES[(i + j) % len(FAMILIES)], kind, structure)
            for i, kind in enumerate(CROSS_KINDS) for j, structure in enumerate(STRUCTURES)]  # fmt: skip


def tiny_tower(kind: str = "full", structure: str = "parallel", out_dim: int = 1, prefix: str = "") -> TowerSpec:
    """Two id features and one dense feature (x0 is 11 wide), two cross layers of `kind`, an [8, 6] MLP."""
    return TowerSpec(
        sparse=[SparseFeature(f"{prefix}id_a", cardinality=20, dim=4), SparseFeature(f"{prefix}id_b", 7, 4)],
        dense=[DenseFeature(f"{prefix}dense", dim=3)],
        # mixture with tanh and a diag_scale on full rank, so those options are exported too
        cross=CrossSpec(
            kind=kind,
            layers=2,
            rank=4,
            experts=2,
            activation="tanh" if kind == "mixture" else "relu",
            diag_scale=0.5 if kind == "full" else 0.0,
        ),
        deep=[8, 6],
        structure=structure,
        head=[5],
        out_dim=out_dim,
    )


def zoo_spec(family: str, kind: str = "full", structure: str = "parallel") -> ModelSpec:
    """The tiny spec of one family with the given cross kind and structure in every tower."""
    if family == "retrieval":
        return ModelSpec(
            family="retrieval",
            towers={
                "query": tiny_tower(kind, structure, out_dim=8, prefix="user_"),
                "item": tiny_tower(kind, structure, out_dim=8, prefix="item_"),
            },
            name=f"zoo-retrieval-{kind}-{structure}",
        )
    if family == "ranking":
        return ModelSpec(
            family="ranking", towers={"ranker": tiny_tower(kind, structure)}, name=f"zoo-ranking-{kind}-{structure}"
        )
    if family == "projection":
        return ModelSpec(
            family="projection",
            towers={"engagement": tiny_tower(kind, structure)},
            sequence=SequenceSpec(
                name="actions", cardinality=30, length=6, d_model=8, heads=2, layers=1, ff_dim=16, project_to=4
            ),
            tasks=["click", "like"],
            name=f"zoo-projection-{kind}-{structure}",
        )
    raise ValueError(f"unknown family {family!r}")


def zoo_model(family: str, kind: str = "full", structure: str = "parallel", seed: int = 0) -> tuple[nn.Module, ModelSpec]:
    """A seeded, eval-mode model for `zoo_spec`, its zero-initialised biases made non-zero so they count."""
    spec = zoo_spec(family, kind, structure)
    torch.manual_seed(seed)
    model = build_model(spec)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") and not param.any():
                param.normal_(0.0, 0.1)
    return model.eval(), spec
