"""What `dcnc verify` decided: each gate (a measured value against its threshold) and the report that holds every
section (parity, retrieval or ranking, latency) with the machine it ran on; toolkit.report renders it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SCHEMA = "dcnc.verify/1"


@dataclass
class Gate:
    """One checked condition: `value` compared with `threshold` by `op` (">=" or "<="). A `reason` says why the
    value cannot be judged (an inconclusive latency): such a gate fails, whatever the value."""

    name: str
    value: float
    threshold: float
    op: str
    reason: str | None = None

    @property
    def passed(self) -> bool:
        if self.reason is not None or math.isnan(self.value):
            return False
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "threshold": self.threshold, "op": self.op,
                "passed": self.passed, "reason": self.reason}


@dataclass
class Report:
    """Everything verify measured and decided. `passed` is true when every gate passed."""

    reference: str
    candidate: str
    precision: str
    device: str
    gates: list[Gate]
    parity: dict[str, dict[str, Any]]
    retrieval: dict[str, Any] | None = None
    ranking: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    thresholds: dict[str, Any] = field(default_factory=dict)
    data: str = ""
    emulation: str | None = None  # how the candidate's answers were computed, when not by the bundle itself
    reference_math: str | None = None  # how the reference computed, where it could differ (TF32 on CUDA)
    quality_absent: str | None = None  # why the data gave no quality metric (numeric-only verify)
    weights: dict[str, Any] | None = None  # per tower: source weights checked by name against the reference's
    seconds: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # e.g. an INT8 bundle running on a CPU it was not built for

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def failed_gates(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]
