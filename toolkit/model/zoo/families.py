"""The three model families (retrieval two-tower, ranking, projection/engagement) and building them from a spec.

Every exportable tower has `input_specs` (its inputs in forward order), `output_names`, and a forward that
takes those tensors positionally; every model has `towers()` naming its exportable towers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.core.signature import TensorSpec
from toolkit.model.spec import ModelSpec, SequenceSpec, TowerSpec
from toolkit.model.zoo.towers import FeatureEncoder, Head, Interaction, cross_network

MASK_VALUE = -1.0e4  # finite, so a half-precision graph keeps it finite and a fully padded row stays defined


class RetrievalTower(nn.Module):
    """[DCNv2 ‖ MLP] -> concat -> head -> L2-normalised embedding."""

    output_names = ["embedding"]

    def __init__(self, spec: TowerSpec):
        super().__init__()
        self.features = FeatureEncoder(spec)
        self.interaction = Interaction(self.features.width, spec)
        self.head = Head(self.interaction.out_width, spec.head, spec.out_dim)
        self.input_specs = self.features.input_specs

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        x0 = torch.cat(self.features(list(inputs)), dim=-1)
        return F.normalize(self.head(self.interaction(x0)), dim=-1)


class TwoTower(nn.Module):
    """Query tower and item tower; the score of a pair is the dot product of their embeddings."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.query = RetrievalTower(spec.towers["query"])
        self.item = RetrievalTower(spec.towers["item"])

    def towers(self) -> dict[str, nn.Module]:
        return {"query": self.query, "item": self.item}

    @staticmethod
    def score(query_embedding: torch.Tensor, item_embedding: torch.Tensor) -> torch.Tensor:
        return query_embedding @ item_embedding.T


class Ranker(nn.Module):
    """A DCNv2 tower ending in one logit; the probability is the sigmoid of it, kept in FP32 by the lowering."""

    output_names = ["logit", "probability"]

    def __init__(self, spec: ModelSpec):
        super().__init__()
        tower = spec.towers["ranker"]
        self.features = FeatureEncoder(tower)
        self.interaction = Interaction(self.features.width, tower)
        self.head = Head(self.interaction.out_width, tower.head, 1)
        self.input_specs = self.features.input_specs

    def towers(self) -> dict[str, nn.Module]:
        return {"ranker": self}

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = torch.cat(self.features(list(inputs)), dim=-1)
        logit = self.head(self.interaction(x0)).squeeze(-1)
        return logit, torch.sigmoid(logit)


class EncoderBlock(nn.Module):
    """Pre-norm Transformer encoder block written with plain ops, so it exports to portable ONNX."""

    def __init__(self, d_model: int, heads: int, ff_dim: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_dim), nn.GELU(), nn.Linear(ff_dim, d_model))

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5 + mask_bias
        attended = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, length, d)
        x = x + self.proj(attended)
        return x + self.ff(self.norm2(x))


class SequenceEncoder(nn.Module):
    """Action ids [B, L] (0 = padding) -> Transformer -> masked mean pool -> DCNv2 projection to a smaller width."""

    def __init__(self, spec: SequenceSpec):
        super().__init__()
        self.actions = nn.Embedding(spec.cardinality, spec.d_model, padding_idx=0)
        self.positions = nn.Parameter(torch.randn(spec.length, spec.d_model) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(spec.d_model, spec.heads, spec.ff_dim) for _ in range(spec.layers))
        self.norm = nn.LayerNorm(spec.d_model)
        self.project_cross = cross_network(spec.d_model, spec.project_cross)
        self.project = nn.Linear(spec.d_model, spec.project_to)
        self.input_spec = TensorSpec(spec.name, "int64", ("B", spec.length), high=spec.cardinality)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        valid = (ids != 0).to(torch.float32)  # [B, L]
        mask_bias = ((1.0 - valid) * MASK_VALUE)[:, None, None, :]
        x = self.actions(ids) + self.positions
        for block in self.blocks:
            x = block(x, mask_bias)
        x = self.norm(x)
        pooled = (x * valid.unsqueeze(-1)).sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp(min=1.0)
        return self.project(self.project_cross(pooled))


class EngagementModel(nn.Module):
    """Projection family: the pooled, DCNv2-projected sequence joins the other features in x0, then
    [DCNv2 ‖ MLP] and one logit head per task."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        tower = spec.towers["engagement"]
        self.sequence = SequenceEncoder(spec.sequence)
        self.features = FeatureEncoder(tower)
        width = spec.sequence.project_to + self.features.width
        self.interaction = Interaction(width, tower)
        self.heads = nn.ModuleDict({t: Head(self.interaction.out_width, tower.head, 1) for t in spec.tasks})
        self.input_specs = [self.sequence.input_spec] + self.features.input_specs
        self.output_names = list(spec.tasks)

    def towers(self) -> dict[str, nn.Module]:
        return {"engagement": self}

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x0 = torch.cat([self.sequence(inputs[0])] + self.features(list(inputs[1:])), dim=-1)
        hidden = self.interaction(x0)
        return tuple(head(hidden).squeeze(-1) for head in self.heads.values())


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised model for `spec` (call spec.validate() first for a readable error)."""
    family = {"retrieval": TwoTower, "ranking": Ranker, "projection": EngagementModel}[spec.family]
    return family(spec)
