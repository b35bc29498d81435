"""Convert a loaded tower to ONNX with torch's dynamo exporter: stable names, a dynamic "batch" axis, graph
passes, dcnc metadata props (spec, tower, branch modules, versions, source hash), deterministic bytes, one
self-contained file written atomically (toolkit.core.onnxio). `dcnc export` (toolkit.commands.export) stages the
files and validates them against torch."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from toolkit import __version__
from toolkit.core.errors import DcncError
from toolkit.core.fileio import sha256_file
from toolkit.core.onnxio import save_onnx, set_metadata
from toolkit.core.signature import TensorSpec
from toolkit.model.loading import BATCH, LoadedModel, LoadedTower

if TYPE_CHECKING:
    import onnx
    import onnx_ir

    from graphs.passes.manager import PassRecord

BATCH_AXIS = "batch"  # the ONNX name of the dynamic batch dimension
TORCHLIB_OPSET = 18  # the opset torch's exporter is written in; lower ones need onnx's converter, which often fails
# Node metadata the exporter adds that depends on where the source lives, not on the model.
DROPPED_NODE_METADATA = ("pkg.torch.onnx.stack_trace",)

# Graph passes: pass names ("default", "gpu", "none", "cleanup,fold", a list), or a ModelProto -> ModelProto
# callable (a PassPipeline leaves its `records` on itself), or None for the exporter's own output.
Passes = Callable[["onnx.ModelProto"], "onnx.ModelProto"]
PassSelection = str | Sequence[str] | Passes | None


@dataclass
class ExportResult:
    """One tower's exported file; `parity` holds its validation checks (None when not validated)."""

    tower: str
    path: Path
    size: int
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[str]
    opset: int
    parity: list | None = None  # toolkit.evaluate.parity.OutputParity of each check, when validated
    passes: list[PassRecord] = field(default_factory=list)  # what each graph pass did, in order

    @property
    def passed(self) -> bool:
        return self.parity is None or all(c.passed for c in self.parity)


def supported_opsets() -> range:
    """Opsets the exporter reaches: its own (18) up to the newest its version converter and onnx both know."""
    import onnx

    try:
        from onnxscript.version_converter._version_converter import (
            SUPPORTED_MAX_ONNX_OPSET,
        )
    except ImportError:  # pragma: no cover - a future onnxscript that moved the constant
        SUPPORTED_MAX_ONNX_OPSET = TORCHLIB_OPSET
    return range(TORCHLIB_OPSET, min(SUPPORTED_MAX_ONNX_OPSET, onnx.defs.onnx_opset_version()) + 1)


def check_opset(opset: int) -> None:
    opsets = supported_opsets()
    if opset not in opsets:
        raise DcncError(
            f"--opset {opset}: torch {torch.__version__.split('+')[0]}'s exporter supports opsets"
            f" {opsets.start}..{opsets.stop - 1}"
        )


def export_tower(
    tower: LoadedTower,
    path: str | Path,
    opset: int = TORCHLIB_OPSET,
    metadata: dict[str, str] | None = None,
    passes: PassSelection = None,
) -> ExportResult:
    """Export one tower to `path` (atomically), graph passes applied.

    metadata: extra props (see source_metadata) beside the tower's own and `dcnc.passes` (what each pass did).
    """
    from graphs.passes.manager import attach_records

    check_opset(opset)
    path = Path(path)
    pipeline = pass_pipeline(passes)
    model = tower_to_onnx(tower, opset)
    records: list[PassRecord] = []
    if pipeline is not None:
        try:
            model = pipeline(model)
        except DcncError as err:
            raise type(err)(f"tower {tower.name}: {err}") from None
        records = list(getattr(pipeline, "records", []))
    props = {**(metadata or {}), **tower_metadata(tower)}
    del model.metadata_props[:]  # the passes' own props (with timings) would make the bytes differ run to run
    for key in sorted(props):
        set_metadata(model, key, props[key])
    attach_records(model, records)
    save_onnx(model, path)
    return ExportResult(
        tower.name, path, path.stat().st_size, sha256_file(path), tower.input_specs, tower.output_names, opset,
        passes=records,
    )


def pass_pipeline(passes: PassSelection) -> Passes | None:
    """A callable for `passes`: names become a graphs.passes.manager.PassPipeline (DcncError for an unknown
    name), a callable is kept, None or "none" is None."""
    if passes is None or callable(passes):
        return passes
    from graphs.passes.manager import PassPipeline

    pipeline = PassPipeline(passes)
    return pipeline if pipeline.names else None


def tower_to_onnx(tower: LoadedTower, opset: int = TORCHLIB_OPSET) -> onnx.ModelProto:
    """The tower as a ModelProto: inputs and outputs named as the tower names them, the batch axis "batch",
    and nothing in it that depends on where or when it was exported."""
    with _quiet():
        try:
            if tower.program is not None:
                program = torch.onnx.export(tower.program, (), dynamo=True, opset_version=opset, verbose=False)
            else:
                example = tower.feeds(2)
                args = tuple(torch.from_numpy(example[s.name]) for s in tower.input_specs)
                program = torch.onnx.export(
                    tower.module,
                    args,
                    dynamo=True,
                    dynamic_shapes=dynamic_shapes(tower),
                    opset_version=opset,
                    verbose=False,
                )
            _name_io(program.model, [s.name for s in tower.input_specs], tower.output_names)
            model = program.model_proto
        except DcncError:
            raise
        except Exception as err:
            raise DcncError(f"cannot export tower {tower.name}: {exporter_reason(err)}") from None
    got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise DcncError(f"cannot export tower {tower.name} at opset {opset}: the converter left it at opset {got}")
    _normalise(model, tower)
    return model


def source_metadata(loaded: LoadedModel) -> dict[str, str]:
    """Props shared by every tower of a model: where it came from and what made the file."""
    import onnx

    source = loaded.source if loaded.kind == "factory" else Path(loaded.source).name
    props = {
        "dcnc.version": __version__,
        "dcnc.source": source,
        "dcnc.source_kind": loaded.kind,
        "dcnc.source_sha256": loaded.source_hash,
        "torch.version": torch.__version__,
        "onnx.version": onnx.__version__,
    }
    if loaded.spec is not None:
        props["dcnc.spec"] = loaded.spec.to_toml()
    return props


def tower_metadata(tower: LoadedTower) -> dict[str, str]:
    """Props of one tower: its name, inputs (with id cardinalities), outputs and branch modules."""
    return {
        "dcnc.tower": tower.name,
        "dcnc.inputs": json.dumps([str(s) + (f":{s.high}" if s.high else "") for s in tower.input_specs]),
        "dcnc.outputs": json.dumps(tower.output_names),
        "dcnc.branches": json.dumps(branch_modules(tower.module), sort_keys=True),
    }


def branch_modules(module: torch.nn.Module) -> dict[str, list[str]]:
    """Module paths by role, read from the module tree's names: cross (a cross network), deep (an MLP beside or
    after it), head, and projection (a cross network that projects a sequence). Descendants of a match are
    not listed again. Names, not classes, so programs loaded from .pt2 and users' own modules are read alike."""
    roles: dict[str, list[str]] = {}
    for path in sorted({name.rpartition(".")[0] for name, _ in module.named_parameters()} - {""}):
        parts = path.split(".")
        for depth in range(1, len(parts) + 1):
            prefix, leaf = ".".join(parts[:depth]), parts[depth - 1].lower()
            role = _role(leaf)
            if role:
                if prefix not in roles.get(role, []) and not any(
                    prefix.startswith(p + ".") for ps in roles.values() for p in ps
                ):
                    roles.setdefault(role, []).append(prefix)
                break
    return roles


def _role(leaf: str) -> str | None:
    if "cross" in leaf:
        return "projection" if "project" in leaf else "cross"
    if leaf in ("deep", "mlp", "dnn") or leaf.endswith("_deep") or leaf.startswith("deep"):
        return "deep"
    if leaf in ("head", "heads") or leaf.startswith("head"):
        return "head"
    return None


def exporter_reason(err: BaseException) -> str:
    """One line from the exporter's exception chain: the aten op it stopped at (where it says) and the
    innermost cause's first line."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    texts = [re.sub(r"\x1b\[[0-9;]*m", "", str(e)) for e in chain]
    op = next((m.group(1) for t in texts if (m := re.search(r"target=torch\.ops\.([\w.]+)", t))), None)
    inner = next((t.strip().splitlines()[0] for t in reversed(texts) if t.strip()), type(chain[-1]).__name__)
    reason = f"{op}: {inner}" if op else inner
    reason = reason if len(reason) <= 300 else reason[:297] + "..."
    if any("data-dependent" in t for t in texts):  # torch's wording names symbols (u0), not the user's code
        reason += " (forward branches on a tensor's values, e.g. `if x.sum() > 0`; a graph cannot hold that)"
    return reason


# ---- helpers


def dynamic_shapes(tower: LoadedTower) -> tuple:
    """dynamic_shapes for torch.export, shaped like forward's signature (a *args parameter takes a tuple)."""
    batch = torch.export.Dim(BATCH_AXIS, min=1)
    shapes = [{axis: batch for axis, d in enumerate(s.shape) if d == BATCH} or None for s in tower.input_specs]
    params = inspect.signature(tower.module.forward).parameters.values()
    result: list = []
    used = 0
    for param in params:
        if used == len(shapes):
            break
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            result.append(tuple(shapes[used:]))
            used = len(shapes)
        elif param.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            result.append(shapes[used])
            used += 1
    if used != len(shapes):
        raise DcncError(
            f"cannot export tower {tower.name}: forward takes {used} positional inputs,"
            f" {len(shapes)} are declared ({[s.name for s in tower.input_specs]})"
        )
    return tuple(result)


def _name_io(model: onnx_ir.Model, inputs: list[str], outputs: list[str]) -> None:
    """Give the graph's inputs and outputs their names, first renaming any inner value that holds one of them
    (the exporter names values after aten ops, so an `embedding` output would meet an `embedding` Gather)."""
    import onnx_ir

    graph = model.graph
    values = [*graph.inputs, *(v for n in onnx_ir.traversal.RecursiveGraphIterator(graph) for v in n.outputs)]
    target = {id(v): n for v, n in zip(graph.inputs, inputs)} | {id(v): n for v, n in zip(graph.outputs, outputs)}
    reserved = set(inputs) | set(outputs)
    taken = {v.name for v in values} | set(graph.initializers) | reserved
    for value in values:
        if value.name in reserved and target.get(id(value)) != value.name:
            suffix = 1
            while f"{value.name}_{suffix}" in taken:
                suffix += 1
            value.name = f"{value.name}_{suffix}"
            taken.add(value.name)
    for value in [*graph.inputs, *graph.outputs]:
        if id(value) in target:
            value.name = target[id(value)]


def _normalise(model: onnx.ModelProto, tower: LoadedTower) -> None:
    """Name the batch axis "batch" everywhere, drop location-dependent metadata, check the names held."""
    graph = model.graph
    batch_symbols = {
        value.type.tensor_type.shape.dim[axis].dim_param
        for value, spec in zip(graph.input, tower.input_specs)
        for axis, d in enumerate(spec.shape)
        if d == BATCH and axis < len(value.type.tensor_type.shape.dim)
    } - {""}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in batch_symbols:
                dim.dim_param = BATCH_AXIS
    for node in [*graph.node, *(n for f in model.functions for n in f.node)]:
        kept = [p for p in node.metadata_props if p.key not in DROPPED_NODE_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    model.doc_string = ""
    graph.doc_string = ""
    inputs, outputs = [v.name for v in graph.input], [v.name for v in graph.output]
    if inputs != [s.name for s in tower.input_specs] or outputs != tower.output_names:
        raise DcncError(
            f"cannot export tower {tower.name}: the graph has inputs {inputs} and outputs {outputs},"
            f" expected {[s.name for s in tower.input_specs]} and {tower.output_names}"
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter: its progress prints, its logging (torchvision notes, opset conversion notes), and
    its warnings; the error it raises still carries what it has to say."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
