"""Tower building blocks: feature encoding into x0, the MLP, and the cross/deep interaction by structure."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.core.signature import TensorSpec
from toolkit.model.spec import CrossSpec, TowerSpec
from toolkit.model.zoo.cross import CrossNetwork


def mlp(in_width: int, widths: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear + ReLU per hidden width; empty `widths` gives the identity."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_width, width), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        in_width = width
    return nn.Sequential(*layers)


def cross_network(width: int, cross: CrossSpec) -> CrossNetwork:
    return CrossNetwork(
        width,
        kind=cross.kind,
        layers=cross.layers,
        rank=cross.rank,
        experts=cross.experts,
        activation=cross.activation,
        bias=cross.bias,
        diag_scale=cross.diag_scale,
    )


class FeatureEncoder(nn.Module):
    """Sparse ids -> embedding tables (inside the model), concatenated with dense floats into x0."""

    def __init__(self, spec: TowerSpec):
        super().__init__()
        self.sparse_names = [f.name for f in spec.sparse]
        self.dense_names = [f.name for f in spec.dense]
        self.embeddings = nn.ModuleDict({f.name: nn.Embedding(f.cardinality, f.dim) for f in spec.sparse})
        for table in self.embeddings.values():
            nn.init.normal_(table.weight, std=0.1)
        self.input_specs = [TensorSpec(f.name, "int64", ("B",), high=f.cardinality) for f in spec.sparse] + [
            TensorSpec(f.name, "float32", ("B", f.dim)) for f in spec.dense
        ]
        self.width = spec.input_width

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Features in `input_specs` order -> the list of pieces of x0."""
        sparse, dense = inputs[: len(self.sparse_names)], inputs[len(self.sparse_names) :]
        return [self.embeddings[n](ids) for n, ids in zip(self.sparse_names, sparse)] + list(dense)


class Interaction(nn.Module):
    """The cross network and the MLP on x0, joined by structure:

    parallel [Cross(x0) ‖ MLP(x0)], stacked MLP(Cross(x0)), cross_only Cross(x0),
    stacked_parallel [MLP_s(Cross(x0)) ‖ MLP_p(x0)].
    """

    def __init__(self, width: int, spec: TowerSpec):
        super().__init__()
        self.structure = spec.structure
        self.cross = cross_network(width, spec.cross)
        if spec.structure == "parallel":
            self.deep = mlp(width, spec.deep, spec.dropout)
            self.out_width = width + spec.deep[-1]
        elif spec.structure == "stacked":
            self.deep = mlp(width, spec.deep, spec.dropout)
            self.out_width = spec.deep[-1]
        elif spec.structure == "cross_only":
            self.out_width = width
        else:  # stacked_parallel
            stacked = spec.stacked_deep or spec.deep
            self.stacked_deep = mlp(width, stacked, spec.dropout)
            self.deep = mlp(width, spec.deep, spec.dropout)
            self.out_width = stacked[-1] + spec.deep[-1]

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        crossed = self.cross(x0)
        if self.structure == "parallel":
            return torch.cat([crossed, self.deep(x0)], dim=-1)
        if self.structure == "stacked":
            return self.deep(crossed)
        if self.structure == "cross_only":
            return crossed
        return torch.cat([self.stacked_deep(crossed), self.deep(x0)], dim=-1)


class Head(nn.Module):
    """Hidden layers then a linear output of `out_dim`."""

    def __init__(self, in_width: int, hidden: list[int], out_dim: int):
        super().__init__()
        self.hidden = mlp(in_width, hidden)
        self.out = nn.Linear(hidden[-1] if hidden else in_width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x))
