"""The pass manager: runs named ONNX -> ONNX passes in order, validating the graph and the cross/deep
concurrency invariant after each one, and keeps a record of what every pass changed."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import onnx

from graphs.branches import analyze, check_concurrency
from graphs.passes.canonicalize import canonicalize
from graphs.passes.cleanup import cleanup
from graphs.passes.fold import fold_constants
from graphs.passes.fusion import fuse_entry_gemms
from toolkit.core.errors import DcncError
from toolkit.core.onnxio import first_line, set_metadata

Pass = Callable[[onnx.ModelProto], tuple[onnx.ModelProto, list[str]]]

PASSES: dict[str, Pass] = {
    "cleanup": cleanup,  # Identity, inference Dropout, no-op Cast, dead nodes, duplicate initializers
    "fold": fold_constants,  # constant folding
    "canonicalize": canonicalize,  # MatMul + Add -> Gemm; nodes named cross/<l>/..., deep/<l>/..., head/...
    "fuse_entry": fuse_entry_gemms,  # x0's Gemms -> one Gemm + Split (GPU targets)
}
# The default for `dcnc export`: CPU targets, where horizontal fusion of the entry Gemms measured no gain.
DEFAULT_PASSES: tuple[str, ...] = ("cleanup", "fold", "canonicalize")
GPU_PASSES: tuple[str, ...] = DEFAULT_PASSES + ("fuse_entry",)
METADATA_KEY = "dcnc.passes"


@dataclass
class PassRecord:
    """One pass's effect: node counts around it, what changed, and how long it took."""

    name: str
    nodes_before: int
    nodes_after: int
    changes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_passes(names: str | Sequence[str]) -> list[str]:
    """`"default"`, `"gpu"`, `"none"`, a comma-separated string or a list of pass names -> the pass list."""
    if isinstance(names, str):
        key = names.strip().lower()
        if key == "default":
            return list(DEFAULT_PASSES)
        if key == "gpu":
            return list(GPU_PASSES)
        if key in ("none", ""):
            return []
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise DcncError(f"--passes: unknown pass {unknown[0]!r}; known: {', '.join(PASSES)}, or default, gpu, none")
    return list(names)


def validate(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """onnx.checker then strict shape inference; the model with refreshed value_info, or DcncError naming `where`."""
    try:
        onnx.checker.check_model(model)
        del model.graph.value_info[:]  # stale after a rewrite; inference recomputes them
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        first = first_line(err)
        raise DcncError(f"{where}: invalid ONNX graph ({first})") from None


def run_passes(model: onnx.ModelProto, names: str | Sequence[str] = "default") -> tuple[onnx.ModelProto, list[PassRecord]]:
    """Run the passes `names` in order on `model`; the result and one PassRecord per pass.

    After every pass the graph must pass onnx.checker and strict shape inference, and, if the input's cross and
    deep branches both hung off x0, they still must (ConcurrencyBroken, naming the pass, if not).
    """
    order = resolve_passes(names)
    model = validate(model, "input graph")
    was_parallel = analyze(model).parallel
    records = []
    for name in order:
        before = len(model.graph.node)
        start = time.perf_counter()
        model, changes = PASSES[name](model)
        model = validate(model, f"after pass {name!r}")
        if was_parallel:
            check_concurrency(model, where=f"after pass {name!r}")
        records.append(PassRecord(name, before, len(model.graph.node), changes, time.perf_counter() - start))
    return model, records


class PassPipeline:
    """The passes `names` as one ModelProto -> ModelProto callable (graphs.export.export_tower's `passes=`);
    after a call, `records` holds what each pass did."""

    def __init__(self, names: str | Sequence[str] = "default"):
        self.names = resolve_passes(names)
        self.records: list[PassRecord] = []

    def __call__(self, model: onnx.ModelProto) -> onnx.ModelProto:
        model, self.records = run_passes(model, self.names)
        return model


def attach_records(model: onnx.ModelProto, records: list[PassRecord]) -> onnx.ModelProto:
    """Store what each pass did in the model's metadata (`dcnc.passes`): per pass its name, node counts around it
    and what it changed. Not its time: the file's bytes must not depend on how fast the machine was."""
    return set_metadata(model, METADATA_KEY, [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in records])
