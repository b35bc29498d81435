"""`dcnc package --triton`: a Triton Inference Server model repository from a bundle, one model per tower.

Each tower becomes `REPO/<model>/config.pbtxt` and `REPO/<model>/1/model.onnx` (platform `onnxruntime_onnx`, for
ort / ort-cuda bundles) or `1/model.plan` (`tensorrt_plan`). The config is derived from the manifest alone:
max_batch_size from the batch profile, inputs/outputs without the batch axis, dynamic batching preferring the
profile's opt batch, instance groups on the bundle's device kind, and the session settings dcnc verified the
bundle with (ORT graph optimisation level, sequential executor, intra-op threads; CUDA graphs for TensorRT).

No ensemble is written, because none of dcnc's families has a step to chain inside the server: a retrieval
bundle's query tower serves requests while its item tower embeds the corpus offline for the ANN index (the dot
product happens in the index, not between the two models), and a ranking or projection tower is one graph from
features to its logit or task heads.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from toolkit.backends.bundle import Manifest, TowerEntry, external_files, load_manifest
from toolkit.core import fileio
from toolkit.core.errors import DcncError
from toolkit.core.fileio import atomic_dir
from toolkit.core.paths import DIR, FOLDER, check_outputs, output

VERSION = "1"  # Triton serves the highest numbered version directory; a package holds one
PLATFORMS = {"ort": "onnxruntime_onnx", "ort-cuda": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
MODEL_FILES = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
INSTANCE_KINDS = {"ort": "KIND_CPU", "ort-cuda": "KIND_GPU", "tensorrt": "KIND_GPU"}
# numpy dtype names (as the manifest records them) -> Triton's DataType (model_config.proto)
DATA_TYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16",
}
# dcnc's --ort-opt-level -> Triton's `optimization { graph { level } }` (onnxruntime_backend: -1 basic, 1 extended,
# 2 disable; absent = all, ORT's own default)
GRAPH_LEVELS = {"disable": 2, "basic": -1, "extended": 1, "all": None}
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
DEFAULT_QUEUE_DELAY_US = 100


@dataclass(frozen=True)
class TritonModel:
    """One Triton model: its directory name, the tower it serves, its config.pbtxt text, and the files of its
    version directory (name there -> path relative to the bundle)."""

    name: str
    tower: str
    platform: str
    config: str
    files: dict[str, str]


# --- config.pbtxt ---------------------------------------------------------------------------------------------
def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _tensor(tensor: dict, kind: str, tower: str, where: str) -> str:
    """One `input`/`output` entry: Triton data type and dims without the batch axis. A tensor that is only the batch
    axis (one id per row) is declared as [1] and reshaped to [] for the model, as Triton documents."""
    name, dtype, shape = tensor["name"], tensor["dtype"], list(tensor["shape"])
    if not shape or isinstance(shape[0], int):
        raise DcncError(
            f"{where}: tower {tower} {kind} {name} has shape {shape}, without a"
            " leading dynamic batch axis, so Triton cannot batch it; re-export the tower with a dynamic batch"
        )
    if dtype not in DATA_TYPES:
        raise DcncError(f"{where}: tower {tower} {kind} {name} has dtype {dtype}, which Triton has no type for")
    dims = [d if isinstance(d, int) else -1 for d in shape[1:]]  # named dims other than the batch stay dynamic
    lines = [f"    name: {_quote(name)}", f"    data_type: {DATA_TYPES[dtype]}"]
    if dims:
        lines.append(f"    dims: [ {', '.join(str(d) for d in dims)} ]")
    else:
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    return "  {\n" + "\n".join(lines) + "\n  }"


def _io_block(field: str, tensors: list[dict], tower: str, where: str) -> str:
    return f"{field} [\n" + ",\n".join(_tensor(t, field, tower, where) for t in tensors) + "\n]"


def _ort_settings(manifest: Manifest) -> list[str]:
    """The ONNX Runtime session dcnc verified: its graph optimisation level, the sequential executor (DESIGN 2) and
    its intra-op threads (0 = ORT picks the server's cores, as dcnc's default does)."""
    ort = manifest.options.get("ort", {})
    blocks = []
    level = GRAPH_LEVELS[ort.get("opt_level", "all")]
    if level is not None:
        blocks.append(f"optimization {{\n  graph {{ level: {level} }}\n}}")
    if manifest.backend == "ort-cuda" and ort.get("cuda_graph"):
        # dcnc replays one CUDA graph per batch size through I/O binding and gpu_graph_id; Triton's ORT backend does
        # neither, and its dynamic batches vary in size, so the graphs are left off here
        blocks.append("# the bundle's CUDA graphs are not carried over: Triton's ORT backend cannot replay per batch")
    threads = ort.get("threads") or 0
    blocks.append('parameters { key: "execution_mode" value: { string_value: "0" } }')
    blocks.append(f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{threads}" }} }}')
    return blocks


def _tensorrt_settings(manifest: Manifest) -> list[str]:
    trt = manifest.options.get("tensorrt", {})
    built = manifest.versions.get("tensorrt")
    capability = manifest.device.get("compute_capability")
    notes = [f"# the engine was built by TensorRT {built} for compute capability {capability}: Triton must run the"
             " same TensorRT on such a GPU"]
    if trt.get("version_compatible"):
        notes.append(
            "# version-compatible engine: start tritonserver with --backend-config=tensorrt,version-compatible=true"
        )
    if trt.get("cuda_graph"):
        notes.append("optimization {\n  cuda { graphs: true }\n}")
    return notes


def model_config(
    manifest: Manifest,
    tower: str,
    name: str,
    instances: int = 1,
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    where: str = "bundle",
) -> str:
    """config.pbtxt text for `tower` of a bundle's manifest, served as model `name`.

    Args:
        instances: model instances (per GPU for GPU kinds).
        max_queue_delay_us: how long the dynamic batcher may hold a request to form a larger batch.
        where: the bundle's path, for error messages.

    Raises DcncError when a tower tensor has no leading dynamic batch axis or a dtype Triton lacks, and for a
    TensorRT engine whose profile does not start at batch 1 (Triton sends any batch up to max_batch_size).
    """
    if manifest.backend not in PLATFORMS:
        raise DcncError(f"{where}: backend {manifest.backend!r} has no Triton platform (ort, ort-cuda, tensorrt do)")
    if tower not in manifest.towers:
        raise DcncError(f"{where}: no tower {tower!r} (it has {sorted(manifest.towers)})")
    low, opt, high = (int(manifest.batch[k]) for k in ("min", "opt", "max"))
    if manifest.backend == "tensorrt" and low > 1:
        raise DcncError(
            f"{where}: its TensorRT engines take batches from {low}, but Triton sends batches from 1; rebuild with"
            f" --batch 1:{opt}:{high}"
        )
    entry = manifest.towers[tower]
    platform = PLATFORMS[manifest.backend]
    header = (
        f"# dcnc package: tower {tower} of {where} ({manifest.backend} {manifest.precision},"
        f" batch {low}:{opt}:{high}), built by dcnc {manifest.dcnc}"
    )
    sections = [
        header,
        f"name: {_quote(name)}",
        f"platform: {_quote(platform)}",
        f"max_batch_size: {high}",
        _io_block("input", entry.inputs, tower, where),
        _io_block("output", entry.outputs, tower, where),
        f"dynamic_batching {{\n  preferred_batch_size: [ {opt} ]\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}",
        f"instance_group [\n  {{ count: {instances} kind: {INSTANCE_KINDS[manifest.backend]} }}\n]",
    ]
    sections += _ort_settings(manifest) if platform == "onnxruntime_onnx" else _tensorrt_settings(manifest)
    return "\n".join(sections) + "\n"


# --- the repository -------------------------------------------------------------------------------------------
def _model_files(bundle: Path, entry: TowerEntry, platform: str) -> dict[str, str]:
    if platform == "tensorrt_plan":
        return {MODEL_FILES[platform]: entry.engine}
    # the portable lowered graph, not ORT's saved optimised one: that is tied to the ORT and CPU that made it, while
    # Triton runs its own ORT and redoes the optimisation at the level given in the config
    files = {MODEL_FILES[platform]: entry.onnx}
    for rel in external_files(bundle, entry.onnx):  # inside the bundle and hashed: load_manifest checked them
        files[Path(rel).name] = rel
    return files


def plan_repository(
    bundle: str | Path,
    name_prefix: str | None = None,
    instances: int = 1,
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
) -> list[TritonModel]:
    """The Triton models for every tower of `bundle` (checked with load_manifest: hashes and files), written
    nowhere. Model names are `<name_prefix>_<tower>`, the prefix defaulting to the bundle directory's name."""
    bundle = Path(bundle)
    if instances < 1:
        raise DcncError(f"--instances {instances}: must be at least 1")
    if max_queue_delay_us < 0:
        raise DcncError(f"--max-queue-delay-us {max_queue_delay_us}: must be 0 or more")
    manifest = load_manifest(bundle)
    prefix = name_prefix if name_prefix is not None else bundle.resolve().name
    models = []
    for tower, entry in manifest.towers.items():
        name = f"{prefix}_{tower}"
        if not MODEL_NAME.fullmatch(name):
            raise DcncError(
                f"model name {name!r}: use letters, digits, '_', '.' and '-', starting with a letter or digit"
                " (choose one with --name-prefix)"
            )
        platform = PLATFORMS.get(manifest.backend, "")
        config = model_config(manifest, tower, name, instances, max_queue_delay_us, where=str(bundle))
        models.append(TritonModel(name, tower, platform, config, _model_files(bundle, entry, platform)))
    return models


def _check_repo(repo: Path, bundle: Path, models: list[TritonModel], force: bool) -> None:
    """Refuse (toolkit.core.paths) a repository that is not a writable folder or lies inside or around the bundle,
    and a model already in it (without --force)."""
    outputs = [output(repo, "--triton", FOLDER)]
    outputs += [output(repo / model.name, "--triton", DIR, replace=force) for model in models]
    check_outputs(outputs, [bundle])


def write_repository(bundle: str | Path, repo: str | Path, models: list[TritonModel], force: bool = False) -> None:
    """Write `models` (from plan_repository) into `repo`. Every model directory is staged beside its target and
    renamed into place only when all of them are complete: a failure leaves the repository as it was."""
    bundle, repo = Path(bundle), Path(repo)
    _check_repo(repo, bundle, models, force)
    created = not repo.exists()
    try:
        with contextlib.ExitStack() as stack:
            for model in models:
                staged = stack.enter_context(atomic_dir(repo / model.name, force=force))
                fileio.write_all(staged / "config.pbtxt", model.config.encode())
                (staged / VERSION).mkdir()
                for target, source in model.files.items():
                    shutil.copyfile(bundle / source, staged / VERSION / target)
    except OSError as err:
        raise DcncError(f"{repo}: writing the model repository failed ({err.strerror or err})") from None
    finally:
        if created and repo.is_dir() and not any(repo.iterdir()):
            repo.rmdir()


def package_triton(
    bundle: str | Path,
    repo: str | Path,
    name_prefix: str | None = None,
    instances: int = 1,
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    force: bool = False,
) -> list[TritonModel]:
    """Write a Triton model repository at `repo` from the bundle at `bundle`: one model per tower (see the module
    docstring). Existing models in `repo` are kept; one of the same name is replaced only with `force`.

    Returns the models written.
    """
    models = plan_repository(bundle, name_prefix, instances, max_queue_delay_us)
    write_repository(bundle, repo, models, force)
    return models
