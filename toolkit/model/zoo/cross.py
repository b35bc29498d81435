"""DCN cross layers (DCNv2 full rank, low rank, mixture of low-rank experts; DCNv1 vector) and the cross network."""

from __future__ import annotations

import torch
from torch import nn

CROSS_KINDS = ("full", "low_rank", "mixture", "v1")
ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


class CrossLayerFull(nn.Module):
    """x_{l+1} = x0 * (W x_l + b + diag_scale * x_l) + x_l, W stored [out, in] like nn.Linear and TorchRec."""

    def __init__(self, width: int, bias: bool = True, diag_scale: float = 0.0):
        super().__init__()
        self.linear = nn.Linear(width, width, bias=bias)
        self.diag_scale = float(diag_scale)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        product = self.linear(x)
        if self.diag_scale:
            product = product + self.diag_scale * x
        return x0 * product + x


class CrossLayerLowRank(nn.Module):
    """x_{l+1} = x0 * (U (V x_l) + b + diag_scale * x_l) + x_l, with V: r x N and U: N x r."""

    def __init__(self, width: int, rank: int, bias: bool = True, diag_scale: float = 0.0):
        super().__init__()
        self.down = nn.Linear(width, rank, bias=False)  # V
        self.up = nn.Linear(rank, width, bias=bias)  # U, b
        self.diag_scale = float(diag_scale)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        product = self.up(self.down(x))
        if self.diag_scale:
            product = product + self.diag_scale * x
        return x0 * product + x


class CrossLayerMixture(nn.Module):
    """Mixture of K low-rank experts, each x0 * (U_i a(C_i a(V_i x_l)) + b), mixed by softmax gates, plus x_l.

    The experts' V, C and U are stacked so the layer is three batched matmuls instead of 3K small ones.
    """

    def __init__(
        self,
        width: int,
        rank: int,
        experts: int,
        activation: str = "relu",
        bias: bool = True,
        diag_scale: float = 0.0,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"mixture activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.experts, self.rank = experts, rank
        self.activation = activation
        self.gates = nn.Linear(width, experts, bias=False)  # K bias-free Linear(N, 1) gates, one row each
        bound = 1.0 / width**0.5
        self.v = nn.Parameter(torch.empty(experts, rank, width).uniform_(-bound, bound))
        self.c = nn.Parameter(torch.empty(experts, rank, rank).uniform_(-(rank**-0.5), rank**-0.5))
        self.u = nn.Parameter(torch.empty(experts, width, rank).uniform_(-(rank**-0.5), rank**-0.5))
        self.bias = nn.Parameter(torch.zeros(width)) if bias else None
        self.diag_scale = float(diag_scale)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        h = act(torch.matmul(x.unsqueeze(0), self.v.transpose(1, 2)))  # [K, B, r]
        h = act(torch.matmul(h, self.c.transpose(1, 2)))  # [K, B, r]
        product = torch.matmul(h, self.u.transpose(1, 2))  # [K, B, N]
        if self.bias is not None:
            product = product + self.bias
        if self.diag_scale:
            product = product + self.diag_scale * x
        gate = torch.softmax(self.gates(x), dim=-1)  # [B, K]
        mixed = (x0 * product * gate.transpose(0, 1).unsqueeze(-1)).sum(dim=0)
        return mixed + x


class CrossLayerV1(nn.Module):
    """DCNv1 vector layer: x_{l+1} = x0 * (x_l . w) + b + x_l."""

    def __init__(self, width: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width).uniform_(-(width**-0.5), width**-0.5))
        self.bias = nn.Parameter(torch.zeros(width)) if bias else None

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = x0 * (x @ self.weight).unsqueeze(-1) + x
        return out + self.bias if self.bias is not None else out


class CrossNetwork(nn.Module):
    """A stack of cross layers of one kind; every layer multiplies by the same x0."""

    def __init__(
        self,
        width: int,
        kind: str = "full",
        layers: int = 3,
        rank: int = 32,
        experts: int = 4,
        activation: str = "relu",
        bias: bool = True,
        diag_scale: float = 0.0,
    ):
        super().__init__()
        if kind not in CROSS_KINDS:
            raise ValueError(f"cross kind must be one of {list(CROSS_KINDS)}, got {kind!r}")
        if layers < 1:
            raise ValueError(f"a cross network needs at least one layer, got {layers}")
        if kind == "v1" and diag_scale:
            raise ValueError("diag_scale applies to DCNv2 layers, not the DCNv1 vector layer")

        def make() -> nn.Module:
            if kind == "full":
                return CrossLayerFull(width, bias, diag_scale)
            if kind == "low_rank":
                return CrossLayerLowRank(width, rank, bias, diag_scale)
            if kind == "mixture":
                return CrossLayerMixture(width, rank, experts, activation, bias, diag_scale)
            return CrossLayerV1(width, bias)

        self.kind = kind
        self.width = width
        self.layers = nn.ModuleList(make() for _ in range(layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x
