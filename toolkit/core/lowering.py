"""Records of what a precision lowering did to a tower graph: the half (FP16/BF16) record of graphs.precision and
the INT8 record of calibration.int8. They are data shared by every floor: written into the lowered ONNX's
metadata (key dcnc.lowering), kept in the bundle manifest, read back by reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from toolkit.core.errors import DcncError

METADATA_KEY = "dcnc.lowering"


@dataclass
class HalfLowering:
    """FP16 / BF16: how many nodes run in half, which stayed FP32 and why, how many Casts were added.

    calibration: None without calibration data; else samples, the |x| limit a node must stay under, and the
    max |activation| of each node kept FP32 for range."""

    dtype: str
    half_nodes: int = 0
    kept_fp32: dict[str, str] = field(default_factory=dict)  # node name -> reason
    casts_inserted: int = 0
    calibration: dict | None = None
    kind: str = "half"

    def summary(self) -> str:
        return f"{self.half_nodes} nodes in {self.dtype}, {len(self.kept_fp32)} kept FP32"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Int8Lowering:
    """INT8 Q/DQ: the target's number formats, the calibration behind the ranges, the nodes quantized and kept
    in float, and the tensors whose range is never clipped (skip paths)."""

    target: str
    method: str
    percentile: float | None
    calibration_key: str
    cache_hit: bool
    calibration_samples: int
    quantized_nodes: list[str]
    kept_fp32: list[str]
    quantize_embeddings: bool
    unclipped_tensors: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    kind: str = "int8"

    def summary(self) -> str:
        return (f"{len(self.quantized_nodes)} nodes int8 ({self.target}, {self.method}),"
                f" {len(self.kept_fp32)} kept FP32")  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)


Lowering = HalfLowering | Int8Lowering
KINDS: dict[str, type] = {"half": HalfLowering, "int8": Int8Lowering}


def lowering_from_dict(data: Any, where: str) -> Lowering | None:
    """The record a manifest or metadata prop holds (None for an FP32 graph); DcncError naming `where` when it
    is not one."""
    if data is None:
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in KINDS:
        raise DcncError(f"{where}: lowering record of unknown kind {kind!r} (expected one of {sorted(KINDS)})")
    try:
        return KINDS[kind](**data)
    except TypeError as err:
        raise DcncError(f"{where}: malformed {kind} lowering record ({err})") from None
