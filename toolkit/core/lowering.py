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


WORTHWHILE_SPEEDUP = 1.1  # under it INT8's gain is within the search timing's noise and not worth its rounding


@dataclass
class Int8Lowering:
    """INT8 Q/DQ: the target's number formats, the calibration behind the ranges, the nodes quantized and kept
    in float, and the tensors whose range is never clipped (skip paths).

    isa: the CPU level the weights' bits were chosen for (calibration.isa). recipe: the levers (cross path,
    smoothing, bias correction). smoothing / bias_correction: what those did. gemm_inputs: per Gemm input the
    range chosen, the observed min/max and the share of calibration values clipped. search: the held-out
    agreement search (metric, target, every point tried with its agreement and speed, the one chosen, why each
    layer kept FP32 was kept); None when the lowering was not searched."""

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
    isa: str | None = None
    recipe: dict | None = None
    smoothing: dict | None = None
    bias_correction: dict | None = None
    gemm_inputs: list[dict] = field(default_factory=list)
    search: dict | None = None
    kind: str = "int8"

    def summary(self) -> str:
        text = f"{len(self.quantized_nodes)} nodes int8 ({self.target}"
        text += f", {self.isa}" if self.isa else ""
        text += f", {self.recipe['name']}" if self.recipe else ""
        text += f", {self.method}), {len(self.kept_fp32)} kept FP32"
        chosen = (self.search or {}).get("chosen")
        if chosen:
            agreement = ", ".join(f"{k} {v:.4f}" for k, v in chosen["agreement"].items())
            speed = f", {chosen['speedup']:.2f}x FP32 at batch {self.search['timing_batch']}" if chosen.get("speedup") else ""
            text += f"; held-out {agreement}{speed}"
        return text

    def curve(self) -> list[str]:
        """One line per point the search tried (recipe, layers kept FP32, held-out agreement, speed over FP32),
        the chosen one marked; the Gemm inputs calibration clipped; empty without a search."""
        if not self.search:
            return []
        search = self.search
        lines = [f"search: {search['metric']} >= {search['target']:.4g} on {search['held_out_rows']} held-out rows"
                 + (f" (judged on the unfused Q/DQ graph: this CPU's int8 kernel is not {self.isa}'s)"
                    if search.get("emulated") else "")]
        for index, point in enumerate(search["points"]):
            agreement = ", ".join(f"{k} {v:.4f}" for k, v in point["agreement"].items())
            speed = f", {point['speedup']:.2f}x" if point.get("speedup") else ""
            mark = "*" if index == search.get("chosen_index") else " "
            lines.append(f"{mark} {point['recipe']}, FP32 layers [{', '.join(point['kept'])}]: {agreement}{speed}")
        chosen = search.get("chosen")
        if chosen and chosen.get("speedup") and chosen["speedup"] < WORTHWHILE_SPEEDUP:
            fastest = max(search["points"], key=lambda p: p.get("speedup") or 0)
            lines.append(f"note: at this target INT8 runs {chosen['speedup']:.2f}x FP32 on this CPU ({self.isa}, batch"
                         f" {search['timing_batch']}; the fastest point tried {fastest['speedup']:.2f}x): an FP32 bundle"
                         " may serve as well, or lower --min-agreement for speed")  # fmt: skip
        clipped = [g for g in self.gemm_inputs if g["clipped"] > 0]
        for gemm in clipped:
            lines.append(f"clipped {gemm['node']} input to [{gemm['range'][0]:.4g}, {gemm['range'][1]:.4g}]"
                         f" (minmax [{gemm['minmax'][0]:.4g}, {gemm['minmax'][1]:.4g}]): {gemm['clipped']:.3%} of values")  # fmt: skip
        return lines

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
