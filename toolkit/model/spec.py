"""Model spec: a TOML file that fully describes a dcnc model (family, towers, features, cross network, MLP, heads)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from toolkit.core.errors import DcncError
from toolkit.core.fileio import read_toml
from toolkit.model.zoo.cross import ACTIVATIONS, CROSS_KINDS

FAMILIES = ("retrieval", "ranking", "projection")
STRUCTURES = ("parallel", "stacked", "cross_only", "stacked_parallel")


@dataclass
class SparseFeature:
    """An id feature: int64 [B], looked up in an embedding table inside the model."""

    name: str
    cardinality: int
    dim: int = 16


@dataclass
class DenseFeature:
    """A float feature vector: float32 [B, dim]."""

    name: str
    dim: int


@dataclass
class CrossSpec:
    """The cross network: `kind` in full | low_rank | mixture | v1; rank and experts apply to low_rank / mixture."""

    kind: str = "full"
    layers: int = 3
    rank: int = 32
    experts: int = 4
    activation: str = "relu"
    bias: bool = True
    diag_scale: float = 0.0


@dataclass
class TowerSpec:
    """One tower: x0 = [sparse embeddings, dense], then the cross network and the MLP joined by `structure`.

    `deep` are the MLP's hidden widths; `stacked_deep` those of the MLP after the cross network in
    stacked_parallel (defaults to `deep`); `head` the hidden widths of the head before `out_dim`.
    """

    sparse: list[SparseFeature] = field(default_factory=list)
    dense: list[DenseFeature] = field(default_factory=list)
    cross: CrossSpec = field(default_factory=CrossSpec)
    deep: list[int] = field(default_factory=lambda: [256, 128])
    structure: str = "parallel"
    stacked_deep: list[int] = field(default_factory=list)
    head: list[int] = field(default_factory=list)
    out_dim: int = 1
    dropout: float = 0.0

    @property
    def input_width(self) -> int:
        return sum(f.dim for f in self.sparse) + sum(f.dim for f in self.dense)


@dataclass
class SequenceSpec:
    """The projection family's action sequence: int64 [B, length] ids (0 = padding) through a Transformer encoder,
    mean-pooled, then projected by a DCNv2 block (`project_cross`) to `project_to` wide."""

    name: str = "actions"
    cardinality: int = 1000
    length: int = 16
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    ff_dim: int = 128
    project_to: int = 32
    project_cross: CrossSpec = field(default_factory=lambda: CrossSpec(kind="low_rank", layers=1, rank=16))


@dataclass
class ModelSpec:
    """A whole model. retrieval: towers `query` and `item` with out_dim = embedding width; ranking: one tower
    `ranker` with out_dim 1; projection: one tower `engagement` fed by `sequence`, with one head per task."""

    family: str
    towers: dict[str, TowerSpec]
    sequence: SequenceSpec | None = None
    tasks: list[str] = field(default_factory=list)
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(dataclasses.asdict(self))

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def save(self, path: str | Path) -> None:
        from toolkit.core.fileio import atomic_write_text

        atomic_write_text(Path(path), self.to_toml())

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "spec") -> ModelSpec:
        data = dict(data)
        towers = data.pop("towers", None)
        if not isinstance(towers, dict) or not towers:
            raise DcncError(f"{where}: needs a [towers.NAME] table for each tower")
        sequence = data.pop("sequence", None)
        spec = _build(
            cls,
            {
                **data,
                "towers": {name: _tower(t, f"{where}: towers.{name}") for name, t in towers.items()},
                "sequence": _sequence(sequence, f"{where}: sequence") if sequence is not None else None,
            },
            where,
        )
        spec.validate(where)
        return spec

    @classmethod
    def load(cls, path: str | Path) -> ModelSpec:
        return cls.from_dict(read_toml(path, "spec file"), where=str(path))

    def validate(self, where: str = "spec") -> None:
        """Raise DcncError naming the first field that cannot describe a working model."""
        if self.family not in FAMILIES:
            raise DcncError(f"{where}: family must be one of {list(FAMILIES)}, got {self.family!r}")
        expected = {"retrieval": {"query", "item"}, "ranking": {"ranker"}, "projection": {"engagement"}}[self.family]
        if set(self.towers) != expected:
            raise DcncError(f"{where}: a {self.family} model has towers {sorted(expected)}, got {sorted(self.towers)}")
        if self.family == "projection":
            if self.sequence is None:
                raise DcncError(f"{where}: a projection model needs a [sequence] table")
            if not self.tasks:
                raise DcncError(f"{where}: a projection model needs tasks = [...] (one head each)")
            if len(set(self.tasks)) != len(self.tasks):
                raise DcncError(f"{where}: task names must be unique, got {self.tasks}")
            seq = self.sequence
            if seq.d_model % seq.heads:
                raise DcncError(f"{where}: sequence.d_model ({seq.d_model}) must divide by heads ({seq.heads})")
            _check_cross(seq.project_cross, f"{where}: sequence.project_cross")
        elif self.sequence is not None:
            raise DcncError(f"{where}: [sequence] belongs to projection models, not {self.family}")
        if self.family == "ranking" and self.towers["ranker"].out_dim != 1:
            raise DcncError(f"{where}: a ranking tower ends in one logit (out_dim = 1)")
        for name, tower in self.towers.items():
            tw = f"{where}: towers.{name}"
            if tower.structure not in STRUCTURES:
                raise DcncError(f"{tw}.structure must be one of {list(STRUCTURES)}, got {tower.structure!r}")
            if not tower.sparse and not tower.dense and self.family != "projection":
                raise DcncError(f"{tw}: needs at least one sparse or dense feature")
            names = [f.name for f in tower.sparse] + [f.name for f in tower.dense]
            if self.family == "projection":
                names.append(self.sequence.name)
            if len(set(names)) != len(names):
                raise DcncError(f"{tw}: feature names must be unique, got {names}")
            for f in tower.sparse:
                if f.cardinality < 1 or f.dim < 1:
                    raise DcncError(f"{tw}: sparse feature {f.name!r} needs cardinality >= 1 and dim >= 1")
            for f in tower.dense:
                if f.dim < 1:
                    raise DcncError(f"{tw}: dense feature {f.name!r} needs dim >= 1")
            if any(w < 1 for w in tower.deep + tower.stacked_deep + tower.head) or tower.out_dim < 1:
                raise DcncError(f"{tw}: layer widths must be >= 1")
            if tower.structure in ("parallel", "stacked", "stacked_parallel") and not tower.deep:
                raise DcncError(f"{tw}: structure {tower.structure!r} needs deep = [widths]")
            _check_cross(tower.cross, f"{tw}.cross")


def _check_cross(cross: CrossSpec, where: str) -> None:
    if cross.kind not in CROSS_KINDS:
        raise DcncError(f"{where}.kind must be one of {list(CROSS_KINDS)}, got {cross.kind!r}")
    if cross.layers < 1 or cross.rank < 1 or cross.experts < 1:
        raise DcncError(f"{where}: layers, rank and experts must be >= 1")
    if cross.activation not in ACTIVATIONS:
        raise DcncError(f"{where}.activation must be one of {sorted(ACTIVATIONS)}, got {cross.activation!r}")
    if cross.kind == "v1" and cross.diag_scale:
        raise DcncError(f"{where}: diag_scale applies to DCNv2 layers, not kind = 'v1'")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise DcncError(f"{where}: expected a table, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DcncError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as err:
        raise DcncError(f"{where}: {err}") from None


def _tower(data: Any, where: str) -> TowerSpec:
    if not isinstance(data, dict):
        raise DcncError(f"{where}: expected a table")
    data = dict(data)
    data["sparse"] = [_build(SparseFeature, f, f"{where}.sparse") for f in data.get("sparse", [])]
    data["dense"] = [_build(DenseFeature, f, f"{where}.dense") for f in data.get("dense", [])]
    data["cross"] = _build(CrossSpec, data.get("cross", {}), f"{where}.cross")
    return _build(TowerSpec, data, where)


def _sequence(data: Any, where: str) -> SequenceSpec:
    if not isinstance(data, dict):
        raise DcncError(f"{where}: expected a table")
    data = dict(data)
    if "project_cross" in data:
        data["project_cross"] = _build(CrossSpec, data["project_cross"], f"{where}.project_cross")
    return _build(SequenceSpec, data, where)


def _drop_none(value: Any) -> Any:
    """TOML has no null: drop None fields (an absent optional table)."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value
