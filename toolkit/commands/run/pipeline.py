"""The pipeline file of `dcnc run`: which models to export, which targets to build, how to verify them.

One model:

    [model]
    source = "runs/example/ranker.pt"   # a checkpoint .pt, a torch.export .pt2, or package.module:factory
    # example = "ranker"                # or: the built-in example ("two_tower" | "ranker"), trained if missing
    calib = "data/ranker_calib.npz"     # calibration data for int8 / fp16 / bf16 (default: the checkpoint's)

    [export]
    opset = 18
    passes = "default"                  # default | gpu | none | a list of pass names

    [[targets]]
    name = "ort-int8"
    backend = "ort"                     # ort | ort-cuda | tensorrt
    precision = "int8"                  # fp32 | fp16 | bf16 | int8
    batch = "1:64:512"                  # MIN:OPT:MAX, one N, or [MIN, OPT, MAX]
    gates = { recall_ratio = 0.98 }     # on top of [verify.gates] and the precision's defaults

    [verify]
    data = "data/eval.npz"              # default: the evaluation split the checkpoint names
    ks = [10, 100]
    batch_sizes = [1, 64, 512]
    iterations = 30
    gates = { cosine_min = 0.999 }

Several models: `[[models]]` tables instead of `[model]`; top-level `[export]`, `[verify]` and `[[targets]]` are
shared by every model, and a model's own `export` / `verify` tables override them key by key, its own `targets`
replace them. Relative paths are relative to the pipeline file. Every key is checked: an unknown key or a bad
value is a DcncError naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from toolkit.core.errors import DcncError
from toolkit.core.fileio import read_toml
from toolkit.core.paths import contained

EXAMPLE_PIPELINE = "pipeline.toml"  # in toolkit/examples: the pipeline `dcnc run` runs without a file
EXAMPLE_MODELS = {"two_tower": "retrieval", "ranker": "ranking"}  # example name -> toolkit.example.train family
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # model and target names become folder names
# the run's own files (toolkit.commands.run.stages writes them), which model and target names must not take
SUMMARY, HTML_REPORT = "summary.json", "report.html"  # in OUT, beside the model folders
TRAIN_DIR, EXPORT_DIR, EXPORT_STAMP = "train", "export", "export.stamp.json"  # in OUT/<model>, beside the targets
RESERVED = {"model": (SUMMARY, HTML_REPORT), "target": (TRAIN_DIR, EXPORT_DIR, EXPORT_STAMP)}


@dataclass(frozen=True)
class ExportSettings:
    """graphs.export.export_model's options: opset, passes run on each tower graph, validation against torch."""

    opset: int = 18
    passes: tuple[str, ...] = ("cleanup", "fold", "canonicalize")
    validate: bool = True
    validate_batch: int = 512


@dataclass(frozen=True)
class VerifySettings:
    """toolkit.commands.verify.verify's options. data None: the evaluation split the checkpoint names. gates:
    threshold overrides (toolkit.evaluate.gates keys) on top of the bundle precision's defaults. latency_ci /
    latency_budget: toolkit.evaluate.latency.LatencyPolicy's tolerance and budget_s."""

    data: Path | None = None
    ks: tuple[int, ...] = (1, 10, 100)
    batch_sizes: tuple[int, ...] = (1, 64, 512)
    iterations: int = 50
    warmup: int = 10
    latency: bool = True
    latency_ci: float = 0.10
    latency_budget: float = 3.0
    branches: bool = True
    gates: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """One bundle to build and verify. calib None: the model's calibration data (needed by int8, used by
    fp16/bf16 to choose the nodes kept FP32, not used by fp32). gates: overrides on top of verify's."""

    name: str
    backend: str = "ort"
    precision: str = "fp32"
    batch: tuple[int, int, int] | None = None  # None: build's default (1:256:4096, or a fixed graph's batch)
    calib: Path | None = None
    calib_method: str = "minmax"
    calib_samples: int | None = None
    threads: int | None = None
    gates: dict[str, float] = field(default_factory=dict)

    @property
    def device(self) -> str:
        """Where the bundle runs and verify times it."""
        return "cpu" if self.backend == "ort" else "cuda"

    def lowering(self):
        """The build's Lowering for this target (toolkit.commands.build), whose check holds the option rules."""
        from toolkit.commands.build import Lowering

        return Lowering(self.precision, calib_method=self.calib_method, calib_samples=self.calib_samples)


@dataclass(frozen=True)
class ModelJob:
    """One model of the pipeline: where it comes from, and its export, targets and verification.

    source: what `dcnc export` loads (checkpoint .pt, .pt2, package.module:factory); None for an example, whose
    checkpoint toolkit.example.train.ensure_examples makes. calib: calibration data shared by the targets (default: the
    checkpoint's calib_data)."""

    name: str
    source: str | None
    example: str | None = None
    dataset: str = "synthetic"
    seed: int = 0
    epochs: int | None = None
    calib: Path | None = None
    export: ExportSettings = field(default_factory=ExportSettings)
    targets: tuple[Target, ...] = ()
    verify: VerifySettings = field(default_factory=VerifySettings)


@dataclass(frozen=True)
class Pipeline:
    """The models of one `dcnc run`; `path` is the file they came from (None: the built-in example)."""

    models: tuple[ModelJob, ...]
    path: Path | None = None

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else "built-in example"


# --- value checkers: (value, where) -> parsed value, or _Bad naming what was expected -------------------------
class _Bad(Exception):
    """A value of the wrong kind; the caller adds the file and the key."""


def _integer(value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _Bad(f"expected an integer >= {low}, got {value!r}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise _Bad(f"expected a number, got {value!r}")
    return float(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {value!r}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"expected a non-empty string, got {value!r}")
    return value


def _choice(*choices: str):
    def check(value: Any) -> str:
        if value not in choices:
            raise _Bad(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return check


def _name(value: Any, kind: str = "model") -> str:
    """A model or target name: one folder name of the run's output, not one of the run's own files."""
    if not isinstance(value, str) or not NAME.match(value) or len(value.encode()) > 200:
        raise _Bad(f"{value!r} is not a name of letters, digits, '_', '.', '-' (it names a folder), at most 200 long")
    if value.lower() in RESERVED[kind]:
        raise _Bad(f"{value!r} is a file dcnc run writes there itself (names it keeps: {', '.join(RESERVED[kind])})")
    return value


def _integers(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise _Bad(f"expected a non-empty list of positive integers, got {value!r}")
    return tuple(_integer(v) for v in value)


def _batch(value: Any) -> tuple[int, int, int]:
    """"MIN:OPT:MAX", "N", N, or [MIN, OPT, MAX] (toolkit.commands.build.parse_batch's rules)."""
    from toolkit.commands.build import parse_batch

    if isinstance(value, list) and len(value) == 3:
        text = ":".join(str(_integer(v)) for v in value)
    elif isinstance(value, int) and not isinstance(value, bool):
        text = str(_integer(value))
    elif isinstance(value, str):
        text = value
    else:
        raise _Bad(f"expected MIN:OPT:MAX, e.g. \"1:64:512\", got {value!r}")
    try:
        return parse_batch(text)
    except DcncError as err:
        raise _Bad(str(err).replace("--batch ", "")) from None


def _passes(value: Any) -> tuple[str, ...]:
    from graphs.passes.manager import resolve_passes

    if not isinstance(value, (str, list)) or (isinstance(value, list) and not all(isinstance(v, str) for v in value)):
        raise _Bad(f"expected \"default\", \"gpu\", \"none\" or a list of pass names, got {value!r}")
    try:
        return tuple(resolve_passes(value))
    except DcncError as err:
        raise _Bad(str(err).replace("--passes: ", "")) from None


def _gates(value: Any) -> dict[str, float]:
    from toolkit.evaluate.gates import GATE_KEYS

    if not isinstance(value, dict):
        raise _Bad(f"expected a table of gate thresholds, got {value!r}")
    for key in value:
        if key not in GATE_KEYS:
            raise _Bad(f"unknown gate {key!r} (known: {', '.join(GATE_KEYS)})")
    return {key: _number(v) for key, v in value.items()}


def _opset(value: Any) -> int:
    from graphs.export import check_opset

    try:
        check_opset(_integer(value))
    except DcncError as err:
        raise _Bad(str(err).replace("--opset ", "")) from None
    return value


class _Reader:
    """Reads the tables of one pipeline file, naming the file and the key in every error."""

    def __init__(self, path: Path | None):
        self.path = path
        self.label = str(path) if path is not None else f"toolkit/example/{EXAMPLE_PIPELINE}"
        self.folder = path.parent if path is not None else Path.cwd()

    def fail(self, where: str, message: str) -> DcncError:
        return DcncError(f"{self.label}: {where}: {message}")

    def table(self, data: Any, where: str, checkers: dict[str, Any]) -> dict[str, Any]:
        """The keys of `data` parsed by their checker; an unknown key or a bad value raises DcncError."""
        if not isinstance(data, dict):
            raise self.fail(where, f"expected a table, got {data!r}")
        parsed = {}
        for key, value in data.items():
            if key not in checkers:
                raise self.fail(f"{where}.{key}" if where else key, f"unknown key (known: {', '.join(checkers)})")
            try:
                parsed[key] = checkers[key](value)
            except _Bad as bad:
                raise self.fail(f"{where}.{key}" if where else key, str(bad)) from None
        return parsed

    def inside(self, text: str) -> Path:
        """`text` as a path inside the pipeline file's folder (toolkit.core.paths.contained)."""
        try:
            return contained(self.folder, text, "paths a pipeline names are relative to its folder")
        except DcncError as err:
            raise _Bad(str(err).partition(": ")[2]) from None

    def file(self, value: Any) -> Path:
        """A path relative to the pipeline file's folder, inside it, which must exist."""
        path = self.inside(_text(value))
        if not path.exists():
            raise _Bad(f"{path} not found")
        return path

    def source(self, value: Any) -> str:
        """A checkpoint or .pt2 path (relative to the file, inside its folder, must exist), or
        package.module:factory as given."""
        text = _text(value)
        module, _, attr = text.partition(":")
        if module and attr and "/" not in text and not text.endswith((".pt", ".pth", ".pt2")):
            return text
        path = self.inside(text)
        if not path.is_file():
            raise _Bad(f"{path} not found")
        return str(path)

    def export(self, data: Any, where: str) -> dict[str, Any]:
        return self.table(data, where, {"opset": _opset, "passes": _passes, "validate": _boolean,
                                        "validate_batch": _integer})

    def verify(self, data: Any, where: str) -> dict[str, Any]:
        return self.table(data, where, {
            "data": self.file, "ks": _integers, "batch_sizes": _integers, "iterations": _integer,
            "warmup": lambda v: _integer(v, 0), "latency": _boolean, "branches": _boolean, "gates": _gates,
            "latency_ci": _number, "latency_budget": _number,
        })

    def targets(self, data: Any, where: str) -> tuple[Target, ...]:
        from calibration.ranges import METHODS
        from toolkit.backends import BACKENDS
        from toolkit.commands.build import PRECISIONS

        if not isinstance(data, list) or not data:
            raise self.fail(where, "expected one or more [[targets]] tables")
        targets = []
        for index, entry in enumerate(data):
            here = f"{where}[{index}]"
            values = self.table(entry, here, {
                "name": lambda v: _name(v, "target"), "backend": _choice(*BACKENDS),
                "precision": _choice(*PRECISIONS), "batch": _batch,
                "calib": self.file, "calib_method": _choice(*METHODS),
                "calib_samples": _integer, "threads": _integer, "gates": _gates,
            })
            if "name" not in values:
                raise self.fail(f"{here}.name", "missing (each target needs a name; it names its folder)")
            target = Target(**values)
            try:
                target.lowering().check(target.calib, calib_resolved=False)
            except DcncError as err:
                raise self.fail(here, str(err)) from None
            targets.append(target)
        names = [t.name for t in targets]
        repeated = next((n for n in names if names.count(n) > 1), None)
        if repeated:
            raise self.fail(where, f"target name {repeated!r} appears twice")
        return tuple(targets)

    def model(self, data: Any, where: str, shared: dict[str, Any]) -> ModelJob:
        values = self.table(data, where, {
            "name": _name, "source": self.source, "example": _choice(*EXAMPLE_MODELS), "dataset": _text,
            "seed": lambda v: _integer(v, 0), "epochs": _integer, "calib": self.file,
            "export": lambda v: v, "verify": lambda v: v, "targets": lambda v: v,
        })
        if ("source" in values) == ("example" in values):
            raise self.fail(where, "give exactly one of 'source' (a checkpoint, .pt2 or package.module:factory)"
                                   " and 'example' (two_tower or ranker)")
        example_only = [k for k in ("dataset", "seed", "epochs") if k in values and "example" not in values]
        if example_only:
            raise self.fail(f"{where}.{example_only[0]}", "applies to 'example' models only")
        export = {**shared["export"], **self.export(values.pop("export", {}), f"{where}.export")}
        own_verify = self.verify(values.pop("verify", {}), f"{where}.verify")
        gates = {**shared["verify"].get("gates", {}), **own_verify.get("gates", {})}
        verify = {**shared["verify"], **own_verify, "gates": gates}
        if "targets" in values:
            targets = self.targets(values.pop("targets"), f"{where}.targets")
        elif shared["targets"]:
            targets = shared["targets"]
        else:
            raise self.fail(where, "has no targets: add [[targets]] (shared) or targets to the model")
        source = values.pop("source", None)
        name = values.pop("name", None) or values.get("example") or _source_name(source)
        try:
            name = _name(name)
        except _Bad as bad:
            raise self.fail(f"{where}.name", f"{bad}; set name = \"...\"") from None
        return ModelJob(name=name, source=source, export=ExportSettings(**export),
                        targets=targets, verify=VerifySettings(**verify), **values)

    def pipeline(self, data: dict[str, Any]) -> Pipeline:
        passthrough = {"model": lambda v: v, "models": lambda v: v, "export": lambda v: v,
                       "verify": lambda v: v, "targets": lambda v: v}
        top = self.table(data, "", passthrough)
        if ("model" in top) == ("models" in top):
            raise self.fail("model", "give the model to run: one [model] table or [[models]] tables")
        shared = {
            "export": self.export(top.get("export", {}), "export"),
            "verify": self.verify(top.get("verify", {}), "verify"),
            "targets": self.targets(top["targets"], "targets") if "targets" in top else (),
        }
        if "model" in top:
            models = [self.model(top["model"], "model", shared)]
        else:
            if not isinstance(top["models"], list) or not top["models"]:
                raise self.fail("models", "expected one or more [[models]] tables")
            models = [self.model(m, f"models[{i}]", shared) for i, m in enumerate(top["models"])]
        names = [m.name for m in models]
        repeated = next((n for n in names if names.count(n) > 1), None)
        if repeated:
            raise self.fail("models", f"model name {repeated!r} appears twice (set name = \"...\" to tell them apart)")
        return Pipeline(tuple(models), self.path)


def _source_name(source: str | None) -> str:
    """A model's default name: its file's stem, or the factory's name."""
    if source is None:
        return ""
    if ":" in source and not Path(source).exists():
        return source.rpartition(":")[2].rpartition(".")[2]
    return Path(source).stem


def load_pipeline(path: str | Path | None = None) -> Pipeline:
    """The pipeline in the TOML file `path`, every key checked; None: the built-in example
    (toolkit/example/pipeline.toml: the example two-tower and ranker, each as ORT fp32, fp16 and int8)."""
    if path is None:
        with resources.as_file(resources.files("toolkit.example") / EXAMPLE_PIPELINE) as example:
            return _Reader(None).pipeline(read_toml(example, "pipeline file"))
    path = Path(path)
    return _Reader(path).pipeline(read_toml(path, "pipeline file"))


def describe(pipeline: Pipeline) -> dict[str, Any]:
    """The pipeline as JSON-able data (paths as strings), for the run summary."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {"path": pipeline.label, "models": [plain(dataclasses.asdict(m)) for m in pipeline.models]}
