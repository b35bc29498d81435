"""Artifact bundles: the manifest schema, writing it, and opening a bundle as runners only after its trust checks.

A bundle is a directory: per tower the lowered `<tower>.onnx` (plus ORT's optimised graph or a TensorRT engine
where built), caches, and `manifest.json` recording versions, device, input hashes, precision, batch profile and
every option. It is opened from the manifest alone, and refused with one line when the manifest does not match
its files, the installed runtime or the device (rebuild with `dcnc build --force`).
"""

from __future__ import annotations

import json
import os
import platform
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from toolkit import __version__
from toolkit.core.errors import DcncError, first_line
from toolkit.core.fileio import sha256_file, write_json
from toolkit.core.lowering import Lowering, lowering_from_dict
from toolkit.core.machine import cpu_identity
from toolkit.core.paths import contained

SCHEMA = "dcnc.bundle/1"
MANIFEST = "manifest.json"
REBUILD = "rebuild it with `dcnc build ... --force`"


@dataclass
class TowerEntry:
    """One tower's artifacts (paths relative to the bundle) and its input/output tensors ({name, dtype, shape})."""

    onnx: str
    inputs: list[dict]
    outputs: list[dict]
    source_sha256: str
    optimized_onnx: str | None = None
    engine: str | None = None
    engine_info: dict | None = None  # TensorRT inspector: layers (name, type, precision, tactic), aux_streams
    lowering: Lowering | None = None  # what the precision lowering did: nodes kept FP32 and why, the Q/DQ record
    # sha256_weights of the source ONNX's float initializers, by name: verify matches them to the reference's
    # parameters, the one check a lowering's own error cannot hide (a drifted export under INT8 rounding)
    source_weights: dict[str, str] | None = None


@dataclass
class Manifest:
    """manifest.json. `files` maps every file in the bundle to {sha256, bytes, portable}."""

    backend: str
    precision: str
    batch: dict  # {"min", "opt", "max"}
    versions: dict
    device: dict
    options: dict
    inputs: dict  # hashes of what the bundle was built from: {"model": {...}, "calib": {...} | None}
    towers: dict[str, TowerEntry]
    files: dict[str, dict] = field(default_factory=dict)
    caches: dict = field(default_factory=dict)
    schema: str = SCHEMA
    dcnc: str = __version__
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> Manifest:
        """The manifest in `data` (manifest.json as read), after checking it against the schema: DcncError naming
        `where`, with one line per problem, when a key is missing or a value of the wrong kind."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise DcncError(f"{where}: not a dcnc bundle manifest (schema {found!r}, expected {SCHEMA!r})")
        problems = schema_problems(data)
        if problems:
            lines = "".join(f"\n  {problem}" for problem in problems)
            count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
            raise DcncError(f"{where}: malformed manifest ({count}); {REBUILD}{lines}")
        data = dict(data)
        data["towers"] = {
            name: TowerEntry(**{**entry, "lowering": lowering_from_dict(entry.get("lowering"), where)})
            for name, entry in data["towers"].items()
        }
        return cls(**data)

    def batch_range(self) -> tuple[int, int]:
        return int(self.batch["min"]), int(self.batch["max"])


# --- the manifest's schema ------------------------------------------------------------------------------------
TABLES = ("versions", "device", "options", "inputs")
OPTIONAL_PATHS = ("optimized_onnx", "engine")
SHA256 = re.compile(r"[0-9a-f]{64}")


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def schema_problems(data: dict) -> list[str]:
    """What in a manifest's JSON does not fit the schema, one line each (empty when it fits)."""
    known = {f.name for f in fields(Manifest)}
    problems = [f"{key}: missing" for key in ("backend", "precision", "batch", *TABLES, "towers", "files")
                if key not in data]
    problems += [f"{key}: unknown key" for key in data if key not in known]
    for key in ("backend", "precision", "dcnc", "created"):
        if key in data and not isinstance(data[key], str):
            problems.append(f"{key}: expected a string, got {_kind(data[key])}")
    for key in (*TABLES, "caches"):
        if key in data and not isinstance(data[key], dict):
            problems.append(f"{key}: expected a table, got {_kind(data[key])}")
    if isinstance(data.get("options"), dict):
        problems += _option_problems(data.get("backend"), data["options"])
    if "batch" in data:
        problems += _batch_problems(data["batch"])
    if "towers" in data:
        problems += _tower_problems(data["towers"])
    if "files" in data:
        problems += _file_problems(data["files"])
    return problems


def _option_problems(backend: object, options: dict) -> list[str]:
    """The runtime's options (options.ort or options.tensorrt) must be those its options class takes."""
    if backend in ("ort", "ort-cuda"):
        from toolkit.backends.ort.loader import OrtOptions as kind

        key = "ort"
    elif backend == "tensorrt":
        from toolkit.backends.tensorrt.config import TrtOptions as kind

        key = "tensorrt"
    else:
        return []
    table = options.get(key)
    if not isinstance(table, dict):
        return [f"options.{key}: expected a table, got {_kind(table)}"]
    known = {f.name for f in fields(kind)}
    return [f"options.{key}.{name}: unknown option" for name in table if name not in known]


def _batch_problems(batch: object) -> list[str]:
    if not isinstance(batch, dict):
        return [f"batch: expected a table of min, opt, max, got {_kind(batch)}"]
    values = [batch.get(k) for k in ("min", "opt", "max")]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [f"batch: min, opt and max must be integers, got {[_kind(v) for v in values]}"]
    if not 1 <= values[0] <= values[1] <= values[2]:
        return [f"batch: needs 1 <= min <= opt <= max, got {values}"]
    return []


def _tower_problems(towers: object) -> list[str]:
    if not isinstance(towers, dict) or not towers:
        return [f"towers: expected a table of towers by name, got {'an empty one' if towers == {} else _kind(towers)}"]
    problems = []
    known = {f.name for f in fields(TowerEntry)}
    required = {f.name for f in fields(TowerEntry) if f.default is MISSING}
    for name, entry in towers.items():
        if not isinstance(entry, dict):
            problems.append(f"towers.{name}: expected a table, got {_kind(entry)}")
            continue
        problems += [f"towers.{name}.{key}: missing" for key in sorted(required - set(entry))]
        problems += [f"towers.{name}.{key}: unknown key" for key in entry if key not in known]
        for key in ("onnx", "source_sha256", *OPTIONAL_PATHS):
            if key in entry and not isinstance(entry[key], str) and not (key in OPTIONAL_PATHS and entry[key] is None):
                problems.append(f"towers.{name}.{key}: expected a string, got {_kind(entry[key])}")
        for key in ("inputs", "outputs"):
            if key in entry:
                problems += _tensor_problems(entry[key], f"towers.{name}.{key}")
        for key in ("engine_info", "lowering"):
            if entry.get(key) is not None and not isinstance(entry[key], dict):
                problems.append(f"towers.{name}.{key}: expected a table or null, got {_kind(entry[key])}")
        digests = entry.get("source_weights")
        if digests is not None and not (isinstance(digests, dict) and all(
                isinstance(d, str) and SHA256.fullmatch(d) for d in digests.values())):  # fmt: skip
            problems.append(f"towers.{name}.source_weights: expected a table of sha256 digests or null")
    return problems


def _tensor_problems(tensors: object, where: str) -> list[str]:
    if not isinstance(tensors, list) or not tensors:
        return [f"{where}: expected a list of tensors, got {_kind(tensors)}"]
    for index, tensor in enumerate(tensors):
        ok = (isinstance(tensor, dict) and isinstance(tensor.get("name"), str) and isinstance(tensor.get("dtype"), str)
              and isinstance(tensor.get("shape"), list)
              and all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in tensor["shape"]))
        if not ok:
            expected = "{name, dtype, shape} with a list of ints and names"
            return [f"{where}[{index}]: expected {expected}, got {tensor!r:.80}"]
    return []


def _file_problems(files: object) -> list[str]:
    if not isinstance(files, dict):
        return [f"files: expected a table of files by relative path, got {_kind(files)}"]
    problems = []
    for rel, record in files.items():
        if not isinstance(record, dict):
            problems.append(f"files.{rel}: expected a table {{sha256, bytes, portable}}, got {_kind(record)}")
            continue
        if not isinstance(record.get("sha256"), str) or not SHA256.fullmatch(record["sha256"]):
            problems.append(f"files.{rel}.sha256: expected 64 hex digits, got {record.get('sha256')!r:.80}")
        size = record.get("bytes")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            problems.append(f"files.{rel}.bytes: expected a byte count, got {size!r:.40}")
        if not isinstance(record.get("portable", True), bool):
            problems.append(f"files.{rel}.portable: expected true or false, got {record.get('portable')!r:.40}")
    return problems


# --- what the bundle was built with -------------------------------------------------------------------------
def installed_versions(backend: str) -> dict:
    """Versions of what built (and must run) the bundle; tensorrt and CUDA only for the backends that use them."""
    import onnx
    import torch

    versions = {
        "dcnc": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": None,
        "tensorrt": None,
        "cuda": None,
    }
    if backend in ("ort", "ort-cuda"):
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    if backend == "tensorrt":
        import tensorrt

        versions["tensorrt"] = tensorrt.__version__
    if backend != "ort" and torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
    return versions


def device_identity(backend: str, device_id: int = 0) -> dict:
    """The machine the bundle targets: the CPU always; for GPU backends the GPU and its compute capability."""
    import torch

    device = {"kind": "cpu" if backend == "ort" else "cuda", **cpu_identity()}
    if backend != "ort":
        device["device_id"] = device_id
        device["gpu"] = device["compute_capability"] = None
        if torch.cuda.is_available():  # ort-cuda may run beside a CPU-only torch, then the GPU stays unnamed
            major, minor = torch.cuda.get_device_capability(device_id)
            device["gpu"] = torch.cuda.get_device_name(device_id)
            device["compute_capability"] = f"{major}.{minor}"
    return device


def write_manifest(bundle_dir: Path, manifest: Manifest, portable: dict[str, bool]) -> Manifest:
    """Hash every file in `bundle_dir` into `manifest.files` and write manifest.json there.

    `portable` marks files tied to this runtime/device (False) by relative name; others count as portable.
    """
    manifest.files = {
        str(p.relative_to(bundle_dir)): {
            "sha256": sha256_file(p),
            "bytes": p.stat().st_size,
            "portable": portable.get(str(p.relative_to(bundle_dir)), True),
        }
        for p in sorted(bundle_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    write_json(bundle_dir / MANIFEST, manifest.to_dict())
    return manifest


# --- trust checks -------------------------------------------------------------------------------------------
def load_manifest(bundle: str | Path) -> Manifest:
    """Read a bundle's manifest and check that every file it lists is there, unchanged, and nothing is referenced
    that it does not list. Raises DcncError (one line) on the first mismatch."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise DcncError(f"{bundle}: bundle not found (expected a directory written by `dcnc build`)")
    if not path.is_file():
        raise DcncError(f"{bundle}: not a dcnc bundle (no {MANIFEST})")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DcncError(f"{path}: unreadable manifest ({err}); {REBUILD}") from None
    manifest = Manifest.from_dict(data, str(path))
    for rel in manifest.files:
        contained(bundle, rel, str(path))
    for tower, entry in manifest.towers.items():
        for rel in (entry.onnx, entry.optimized_onnx, entry.engine):
            if rel is not None and rel not in manifest.files:
                raise DcncError(f"{path}: tower {tower} uses {rel}, which the manifest does not hash; {REBUILD}")
    for rel, record in manifest.files.items():
        file = bundle / rel
        if not file.is_file():
            raise DcncError(f"{bundle}: {rel} is listed in the manifest but missing; {REBUILD}")
        if sha256_file(file) != record["sha256"]:
            raise DcncError(f"{bundle}: {rel} does not match the hash in its manifest (modified?); {REBUILD}")
    for rel in [r for r in manifest.files if r.endswith(".onnx")]:
        for data_rel in external_files(bundle, rel):
            if data_rel not in manifest.files:
                raise DcncError(
                    f"{bundle}: {rel} reads its weights from {data_rel}, which the manifest does not hash; {REBUILD}"
                )
    return manifest


def external_files(bundle: Path, onnx_rel: str) -> list[str]:
    """The files (relative to the bundle) that the bundle's ONNX `onnx_rel` keeps its initializers in; DcncError
    for a location that is absolute or leads outside the bundle."""
    from toolkit.core.onnxio import external_data_locations, load_onnx

    model = load_onnx(bundle / onnx_rel, external_data=False)
    where = str(bundle / onnx_rel)
    folder = Path(onnx_rel).parent
    return [
        os.path.normpath(contained(bundle, str(folder / location), where).relative_to(bundle))
        for location in external_data_locations(model)
    ]


def runtime_mismatch(manifest: Manifest) -> str | None:
    """Why the installed runtime or this device cannot be trusted to run the bundle, or None if it can."""
    built = manifest.versions
    if manifest.backend in ("ort", "ort-cuda"):
        from toolkit.backends import require_backend

        require_backend(manifest.backend)
        import onnxruntime

        if onnxruntime.__version__ != built.get("onnxruntime"):
            return f"built with onnxruntime {built.get('onnxruntime')}, installed is {onnxruntime.__version__}"
        optimized = [e.optimized_onnx for e in manifest.towers.values() if e.optimized_onnx]
        if optimized and cpu_identity()["isa"] != manifest.device.get("isa"):
            return (
                f"its ORT-optimised graphs ({optimized[0]}, non-portable) were made on a CPU with"
                f" {manifest.device.get('isa')}, this one has {cpu_identity()['isa']}"
            )
        return None
    if manifest.backend == "tensorrt":
        from toolkit.backends.tensorrt.loader import gpu_identity, require_tensorrt

        installed = require_tensorrt()
        trt_options = manifest.options.get("tensorrt", {})
        if installed != built.get("tensorrt"):
            same_major = installed.split(".")[0] == str(built.get("tensorrt", "")).split(".")[0]
            newer = _version_tuple(installed) >= _version_tuple(str(built.get("tensorrt")))
            if not (trt_options.get("version_compatible") and same_major and newer):
                return f"its engines were built by TensorRT {built.get('tensorrt')}, installed is {installed}"
        here = gpu_identity(int(manifest.device.get("device_id", 0)))["compute_capability"]
        there = manifest.device.get("compute_capability")
        if here != there:
            ampere_plus = trt_options.get("hardware_compat") == "ampere_plus" and _version_tuple(here) >= (8, 0)
            if not ampere_plus:
                return f"its engines were built for compute capability {there}, this GPU has {here}"
        return None
    return f"unknown backend {manifest.backend!r}"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def check_bundle(bundle: str | Path) -> Manifest:
    """load_manifest plus the runtime and device checks: the manifest of a bundle safe to run here."""
    manifest = load_manifest(bundle)
    reason = runtime_mismatch(manifest)
    if reason:
        raise DcncError(f"{bundle}: refusing the bundle: {reason}; {REBUILD}")
    return manifest


# --- opening ------------------------------------------------------------------------------------------------
def tower_runner(bundle: str | Path, manifest: Manifest, tower: str, threads: int | None = None, spinning: bool = True):
    """The runner for one tower of a checked bundle, configured from the manifest, except (ONNX Runtime) for
    `threads` when given and `spinning` (False for runners timed in turn with others)."""
    bundle = Path(bundle)
    if tower not in manifest.towers:
        raise DcncError(f"{bundle}: no tower {tower!r} (it has {sorted(manifest.towers)})")
    entry = manifest.towers[tower]
    name = f"{manifest.backend}:{tower}"
    if manifest.backend in ("ort", "ort-cuda"):
        from toolkit.backends.ort.loader import OrtOptions, SessionFromOnnx
        from toolkit.backends.ort.runner import OrtRunner

        settings = {**manifest.options["ort"], **({"threads": threads} if threads else {})}
        loader = SessionFromOnnx(
            bundle / (entry.optimized_onnx or entry.onnx), manifest.backend,
            _options(OrtOptions, settings, "ort", bundle), preoptimized=bool(entry.optimized_onnx), spinning=spinning,
        )
        return OrtRunner(loader, name=name, batch_range=manifest.batch_range())
    from toolkit.backends.tensorrt.config import TrtOptions
    from toolkit.backends.tensorrt.loader import EngineFromPath
    from toolkit.backends.tensorrt.runner import TrtRunner

    options = _options(TrtOptions, manifest.options["tensorrt"], "tensorrt", bundle)
    return TrtRunner(
        EngineFromPath(bundle / entry.engine, options), name=name, batch_range=manifest.batch_range(),
        device_id=options.device_id, cuda_graph=options.cuda_graph,
    )


def _options(kind: type, settings: dict, key: str, bundle: Path):
    """The runtime's options from what the manifest records (options.<key>), or DcncError when they do not fit."""
    try:
        return kind(**settings)
    except TypeError as err:
        raise DcncError(f"{bundle}: malformed manifest (options.{key}: {first_line(err)}); {REBUILD}") from None


def open_bundle(bundle: str | Path, tower: str | None = None):
    """Check the bundle, then return the runner for `tower`, or {tower: runner} for all towers when tower is None.

    Runners are not yet active: use them as context managers (`with runner: runner.infer(feed)`).
    """
    manifest = check_bundle(bundle)
    if tower is not None:
        return tower_runner(bundle, manifest, tower)
    return {name: tower_runner(bundle, manifest, name) for name in manifest.towers}
