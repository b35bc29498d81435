"""Loading what users bring: a dcnc checkpoint, a `package.module:factory` import path, or a `.pt2` program.

Every path ends in the same shape, a LoadedModel: one LoadedTower per exportable tower, each an eval-mode
module with its inputs (names, dtypes, shapes with the batch dimension named) and its output names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sympy
import torch
from torch import nn

from toolkit.core.errors import DcncError, first_line
from toolkit.core.fileio import sha256_file, sha256_weights
from toolkit.core.signature import TensorSpec, random_inputs
from toolkit.model.pt2 import load_program
from toolkit.model.spec import ModelSpec

BATCH = "B"  # the name TensorSpec gives the batch dimension
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
PROGRAM_SUFFIX = ".pt2"


@dataclass
class LoadedTower:
    """One exportable tower.

    `program` is set for `.pt2` sources: the export uses it directly (its dynamic dimensions as saved).
    `dim_sizes` gives a size to each named dimension other than the batch (only `.pt2` programs have those).
    `batch_range` bounds the batch the tower accepts (a `.pt2` program's range constraint), None = unbounded.
    """

    name: str
    module: nn.Module
    input_specs: list[TensorSpec]
    output_names: list[str]
    program: torch.export.ExportedProgram | None = None
    dim_sizes: dict[str, int] = field(default_factory=dict)
    batch_range: tuple[int, int | None] = (1, None)

    @property
    def has_batch(self) -> bool:
        return any(BATCH in spec.shape for spec in self.input_specs)

    def feeds(self, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Random valid inputs at `batch` (ids inside their cardinality; other named dims at their size)."""
        sized = [
            dataclasses.replace(s, shape=tuple(self.dim_sizes.get(d, d) if isinstance(d, str) else d for d in s.shape))
            for s in self.input_specs
        ]
        return random_inputs(sized, batch, seed)

    def weight_digests(self) -> dict[str, str]:
        """sha256_weights of each float32 parameter and buffer, by its state_dict name."""
        return {name: sha256_weights(value.detach().cpu().numpy()) for name, value in self.module.state_dict().items()
                if value.dtype == torch.float32 and value.dim()}  # fmt: skip

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The torch outputs for `feeds`, keyed by output name."""
        tensors = [torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in self.input_specs]
        with torch.inference_mode():
            outputs = _flatten(self.module(*tensors))
        if len(outputs) != len(self.output_names):
            raise DcncError(
                f"tower {self.name}: forward returned {len(outputs)} outputs, expected {len(self.output_names)}"
                f" ({self.output_names})"
            )
        return {name: out.detach().cpu().numpy() for name, out in zip(self.output_names, outputs)}


@dataclass
class LoadedModel:
    """A model ready to export: its towers, its spec (dcnc checkpoints only), and where it came from.

    files: what it was read from (the checkpoint or program; a factory's module file and weights). eval_data: the
    evaluation split a checkpoint names. calibration: tower -> calibration file, those a checkpoint names
    (`extra.calib_data`), else any `<tower>_calib.npz` beside a model file."""

    towers: dict[str, LoadedTower]
    spec: ModelSpec | None
    source: str
    source_hash: str
    kind: str  # "checkpoint" | "factory" | "pt2"
    files: list[Path] = field(default_factory=list)
    eval_data: Path | None = None
    calibration: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def select(self, names: list[str] | None) -> dict[str, LoadedTower]:
        """The towers named (all when `names` is empty), refusing a name the model does not have."""
        if not names:
            return dict(self.towers)
        unknown = [n for n in names if n not in self.towers]
        if unknown:
            raise DcncError(f"{self.source}: no tower {unknown[0]!r} (towers: {list(self.towers)})")
        return {n: self.towers[n] for n in dict.fromkeys(names)}


class SignedTower(nn.Module):
    """A loaded tower as TorchRunner takes it: the user's module with the signature loading found for it
    (a factory's module need not carry `input_specs` itself)."""

    def __init__(self, tower: Any) -> None:
        super().__init__()
        self.inner = tower.module
        self.input_specs = tower.input_specs
        self.output_names = list(tower.output_names)

    def forward(self, *inputs: Any) -> Any:
        return self.inner(*inputs)


def load_model(ref: str, inputs: list[str] | None = None, weights: str | None = None) -> LoadedModel:
    """Load MODEL as `dcnc export` takes it.

    ref: a dcnc checkpoint (`.pt`), a `torch.export` program (`.pt2`), or `package.module:factory`.
    inputs: `NAME:DTYPE:SHAPE` strings (factory models only), the inputs in forward order; required unless the
        module has `input_specs`.
    weights: a state_dict file for a factory model (torch.load weights_only=True, loaded strictly).
    """
    path = Path(ref)
    if path.suffix == PROGRAM_SUFFIX:
        _only_for_factories(ref, inputs, weights)
        return _load_program(path)
    if path.suffix in CHECKPOINT_SUFFIXES or path.is_file():
        _only_for_factories(ref, inputs, weights)
        return _load_dcnc_checkpoint(path)
    if ":" in ref and not path.exists():
        return _load_factory(ref, inputs or [], weights)
    forms = "MODEL is a checkpoint .pt, a torch.export program .pt2, or package.module:factory"
    raise DcncError(f"{ref}: {'is a directory' if path.is_dir() else 'not found'} ({forms})")


def _only_for_factories(ref: str, inputs: list[str] | None, weights: str | None) -> None:
    if inputs:
        raise DcncError(f"{ref}: --input applies to package.module:factory models; this file carries its inputs")
    if weights:
        raise DcncError(f"{ref}: --weights applies to package.module:factory models; this file carries its weights")


def file_sha256(*paths: Path) -> str:
    """sha256 of one file, or of the files' own hashes in order when there are several."""
    digests = [sha256_file(path) for path in paths]
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


# ---- dcnc checkpoints


def _load_dcnc_checkpoint(path: Path) -> LoadedModel:
    from toolkit.model.checkpoint import load_checkpoint

    if not path.is_file():
        raise DcncError(f"{path}: checkpoint not found")
    try:
        model, spec, extra = load_checkpoint(path)
    except DcncError:
        raise
    except Exception as err:  # a file torch reads but cannot make sense of: still the user's file, not our bug
        raise DcncError(f"{path}: not a readable dcnc checkpoint ({first_line(err)[:300]})") from None
    towers = {
        name: LoadedTower(name, tower.eval(), list(tower.input_specs), list(tower.output_names))
        for name, tower in model.towers().items()
    }
    loaded = LoadedModel(towers, spec, str(path), file_sha256(path), "checkpoint", [path])
    extra = extra if isinstance(extra, dict) else {}
    eval_data = extra.get("eval_data")
    if isinstance(eval_data, str) and eval_data:
        candidate = path.parent / eval_data
        if candidate.is_file():
            loaded.eval_data = candidate
        else:
            loaded.notes.append(f"evaluation data {candidate} named by the checkpoint is missing; random inputs only")
    named = extra.get("calib_data")
    loaded.calibration = _calibration_files(path, towers, named if isinstance(named, dict) else {})
    return loaded


def _calibration_files(path: Path, towers: dict[str, LoadedTower], named: dict) -> dict[str, Path]:
    """Per tower, the calibration file a checkpoint names, else `<tower>_calib.npz` beside the model file."""
    files = {}
    for tower in towers:
        name = named.get(tower)
        for candidate in (name if isinstance(name, str) else None, f"{tower}_calib.npz"):
            if candidate and (path.parent / candidate).is_file():
                files[tower] = path.parent / candidate
                break
    return files


# ---- package.module:factory


def _load_factory(ref: str, inputs: list[str], weights: str | None) -> LoadedModel:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise DcncError(f"{ref}: expected package.module:factory")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        # the user's package may sit in the folder dcnc runs from; last, so no file there can stand in for an
        # installed module (PYTHONPATH=. puts the folder first, when that is wanted)
        sys.path.append(str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise DcncError(f"{ref}: cannot import module {module_name!r} ({type(err).__name__}: {first_line(err)[:300]})") from None
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise DcncError(f"{ref}: module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise DcncError(f"{ref}: {attr!r} is not callable (expected a function returning an nn.Module)")
    try:
        model = factory()
    except Exception as err:
        raise DcncError(f"{ref}: factory {attr} raised {type(err).__name__}: {first_line(err)[:300]}") from None
    if not isinstance(model, nn.Module):
        raise DcncError(f"{ref}: factory {attr} returned {type(model).__name__}, expected a torch.nn.Module")
    sources = [Path(inspect.getsourcefile(module) or module.__file__ or "")]
    if weights:
        _load_weights(model, Path(weights), ref)
        sources.append(Path(weights))
    model.eval()
    parsed = [TensorSpec.parse(text) for text in inputs]
    for spec in parsed:
        named = [d for d in spec.shape if isinstance(d, str) and d != BATCH]
        if named:
            raise DcncError(f"--input {spec}: only the batch dimension may be named ({BATCH}); give {named[0]!r} as an int")
    modules = model.towers() if callable(getattr(model, "towers", None)) else {"model": model}
    if parsed and len(modules) > 1:
        raise DcncError(f"{ref}: --input applies to one-tower models; towers {list(modules)} need their own input_specs")
    towers = {}
    for name, tower in modules.items():
        specs = parsed or list(getattr(tower, "input_specs", None) or [])
        if not specs:
            raise DcncError(f"{ref}: tower {name} has no input_specs; give its inputs with --input NAME:DTYPE:SHAPE")
        towers[name] = _probe(LoadedTower(name, tower.eval(), specs, list(getattr(tower, "output_names", []))), ref)
    existing = [p for p in sources if p.is_file()]
    return LoadedModel(towers, None, ref, file_sha256(*existing) if existing else "", "factory", existing)


def _load_weights(model: nn.Module, path: Path, ref: str) -> None:
    if not path.is_file():
        raise DcncError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DcncError(f"{path}: not a readable state_dict ({first_line(err)[:300]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a dcnc checkpoint or a Lightning-style file holds it under this key
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DcncError(f"{path}: expected a state_dict (names -> tensors)")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DcncError(f"{path}: weights do not match {ref} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise DcncError(
                f"{path}: weights do not match {ref}: {key} has shape {list(state[key].shape)},"
                f" the model has {list(tensor.shape)}"
            )
    model.load_state_dict(state, strict=True)


def _probe(tower: LoadedTower, ref: str) -> LoadedTower:
    """Run the tower once at batch 2: checks the declared inputs fit, and names the outputs it returns."""
    feeds = tower.feeds(2)
    tensors = [torch.from_numpy(feeds[s.name]) for s in tower.input_specs]
    try:
        with torch.inference_mode():
            outputs = _flatten(tower.module(*tensors))
    except Exception as err:
        shown = ", ".join(str(s) for s in tower.input_specs)
        raise DcncError(f"{ref}: tower {tower.name} fails on inputs [{shown}]: {first_line(err)[:300]}") from None
    if not tower.output_names:
        tower.output_names = [f"output_{i}" for i in range(len(outputs))]
    elif len(tower.output_names) != len(outputs):
        raise DcncError(
            f"{ref}: tower {tower.name} names outputs {tower.output_names} but returns {len(outputs)} tensors"
        )
    return tower


# ---- torch.export programs


def _load_program(path: Path) -> LoadedModel:
    if not path.is_file():
        raise DcncError(f"{path}: torch.export program not found")
    program = load_program(path)
    specs, dim_sizes, batch_range = _program_inputs(program, path)
    outputs = [f"output_{i}" for i in range(len(program.graph_signature.user_outputs))]
    tower = LoadedTower(path.stem, program.module(), specs, outputs, program, dim_sizes, batch_range)
    loaded = LoadedModel({tower.name: tower}, None, str(path), file_sha256(path), "pt2", [path])
    loaded.calibration = _calibration_files(path, loaded.towers, {})
    if not tower.has_batch:
        loaded.notes.append(
            f"{path}: the program was exported without a dynamic batch dimension, so its ONNX has fixed shapes"
            " (export it with dynamic_shapes, e.g. {0: torch.export.Dim('batch')}, to keep one)"
        )
    return loaded


def _program_inputs(
    program: torch.export.ExportedProgram, path: Path
) -> tuple[list[TensorSpec], dict[str, int], tuple[int, int | None]]:
    """Input specs from the program's user-input placeholders; a symbolic dim becomes a named dim.

    The symbol on axis 0 of the first input with a symbolic axis 0 is the batch (named B); other symbols keep
    their own name and, for validation, the size they were traced at.
    """
    user_inputs = list(program.graph_signature.user_inputs)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    values = []
    for name in user_inputs:
        value = placeholders[name].meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise DcncError(f"{path}: input {name!r} is not a tensor; dcnc exports towers whose inputs are tensors")
        values.append((name, value))
    batch_symbol = next(
        (str(v.shape[0]) for _, v in values if v.dim() and isinstance(v.shape[0], torch.SymInt)), None
    )
    dim_sizes: dict[str, int] = {}
    batch_range: tuple[int, int | None] = (1, None)
    specs = []
    for name, value in values:
        shape: list[int | str] = []
        for axis, dim in enumerate(value.shape):
            if not isinstance(dim, torch.SymInt):
                shape.append(int(dim))
                continue
            symbol = str(dim)
            if symbol == batch_symbol:
                shape.append(BATCH)
                batch_range = _range(program, dim)
            else:
                label = symbol if re.fullmatch(r"[A-Za-z_]\w*", symbol) else f"{name}_dim{axis}"
                shape.append(label)
                dim_sizes[label] = int(dim.node.hint) if dim.node.hint is not None else 2
        dtype = str(value.dtype).removeprefix("torch.")
        specs.append(TensorSpec(name, dtype, tuple(shape), high=None))
    return specs, dim_sizes, batch_range


def _range(program: torch.export.ExportedProgram, dim: torch.SymInt) -> tuple[int, int | None]:
    bounds = program.range_constraints.get(dim.node.expr)
    if bounds is None:
        return (1, None)
    lower = max(1, int(bounds.lower))
    upper = int(bounds.upper) if isinstance(bounds.upper, sympy.Integer) else None  # else torch's int_oo
    return (lower, upper)


def _flatten(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (tuple, list)):
        return [t for item in outputs for t in _flatten(item)]
    raise DcncError(f"forward returned {type(outputs).__name__}; a tower returns tensors (or a tuple of them)")

