"""User model code for the factory-loading tests: each test copies this file into a package of its own
(`package.module:factory` paths are resolved by import, and sys.modules caches packages by name)."""

import torch
from torch import nn


class Scorer(nn.Module):
    """Embeds ids, concatenates a dense vector, one Linear."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(10, 3)
        self.linear = nn.Linear(7, 2)

    def forward(self, dense, ids):
        return self.linear(torch.cat([dense, self.table(ids)], dim=1))


class Drifting(Scorer):
    """Computes something else while being exported: its ONNX cannot match it."""

    def forward(self, dense, ids):
        out = super().forward(dense, ids)
        return out + 0.1 if torch.compiler.is_exporting() else out


class RunningMax(nn.Module):
    """aten.cummax has no ONNX translation."""

    def forward(self, dense, ids):
        return torch.cummax(dense, dim=1).values


def make_scorer():
    torch.manual_seed(1)
    return Scorer()


def make_drifting():
    return Drifting()


def make_running_max():
    return RunningMax()


def make_broken():
    raise RuntimeError("no GPU found")


def make_number():
    return 3


class Logit(nn.Module):
    """A ranking model without a signature of its own: its inputs come from --input."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, dense):
        return self.linear(dense).squeeze(-1)


def make_logit():
    return Logit()
