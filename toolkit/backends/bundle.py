"""Artifact bundles: the manifest schema, writing it, and opening a bundle as runners only after its trust checks.

A bundle is a directory: per tower the lowered `<tower>.onnx` (plus ORT's optimised graph or a TensorRT engine
where built), caches, and `manifest.json` recording versions, device, input hashes, precision, batch profile and
every option. It is opened from the manifest alone, and refused with one line when the manifest does not match
its files, the installed runtime or the device (rebuild with `dcnc build --force`).
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from toolkit import __version__
from toolkit.core.errors import DcncError
from toolkit.core.fileio import sha256_file, write_json
from toolkit.core.lowering import Lowering, lowering_from_dict
from toolkit.core.machine import cpu_identity

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
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise DcncError(f"{where}: not a dcnc bundle manifest (schema {found!r}, expected {SCHEMA!r})")
        required = ("backend", "precision", "batch", "versions", "device", "options", "inputs", "towers", "files")
        missing = [k for k in required if k not in data]
        if missing:
            raise DcncError(f"{where}: manifest is missing {missing}; {REBUILD}")
        data = dict(data)
        try:
            data["towers"] = {
                name: TowerEntry(**{**entry, "lowering": lowering_from_dict(entry.get("lowering"), where)})
                for name, entry in data["towers"].items()
            }
            return cls(**data)
        except (TypeError, AttributeError) as err:
            raise DcncError(f"{where}: malformed manifest ({err}); {REBUILD}") from None

    def batch_range(self) -> tuple[int, int]:
        return int(self.batch["min"]), int(self.batch["max"])


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
    return manifest


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
            bundle / (entry.optimized_onnx or entry.onnx), manifest.backend, OrtOptions(**settings),
            preoptimized=bool(entry.optimized_onnx), spinning=spinning,
        )
        return OrtRunner(loader, name=name, batch_range=manifest.batch_range())
    from toolkit.backends.tensorrt.config import TrtOptions
    from toolkit.backends.tensorrt.loader import EngineFromPath
    from toolkit.backends.tensorrt.runner import TrtRunner

    options = TrtOptions(**manifest.options["tensorrt"])
    return TrtRunner(
        EngineFromPath(bundle / entry.engine, options), name=name, batch_range=manifest.batch_range(),
        device_id=options.device_id, cuda_graph=options.cuda_graph,
    )


def open_bundle(bundle: str | Path, tower: str | None = None):
    """Check the bundle, then return the runner for `tower`, or {tower: runner} for all towers when tower is None.

    Runners are not yet active: use them as context managers (`with runner: runner.infer(feed)`).
    """
    manifest = check_bundle(bundle)
    if tower is not None:
        return tower_runner(bundle, manifest, tower)
    return {name: tower_runner(bundle, manifest, name) for name in manifest.towers}
