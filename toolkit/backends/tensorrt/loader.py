"""TensorRT engines: build one from a lowered ONNX (strongly typed, via polygraphy's loaders), keep the timing
cache honest, read back the inspector's layer list, and deserialize an engine for running.

`tensorrt` is imported inside the functions, so the rest of dcnc works where it is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

from toolkit.backends.tensorrt.config import (
    TrtOptions,
    create_config,
    optimization_profile,
)
from toolkit.core import fileio
from toolkit.core.errors import DcncError, first_line
from toolkit.core.fileio import write_json

SUPPORTED_MAJORS = (10, 11)


def _tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise DcncError(
            "--backend tensorrt needs the tensorrt package (10.x or 11.x) and an NVIDIA GPU:"
            " pip install tensorrt (on a machine with a CUDA driver)"
        ) from None
    return tensorrt


def require_tensorrt() -> str:
    """The installed TensorRT version, once tensorrt 10/11, polygraphy and a CUDA GPU visible to torch are all here."""
    trt = _tensorrt()
    major = int(trt.__version__.split(".")[0])
    if major not in SUPPORTED_MAJORS:
        raise DcncError(f"--backend tensorrt supports TensorRT 10.x and 11.x, found {trt.__version__}")
    try:
        import polygraphy  # noqa: F401  (its loaders build the network and config)
    except ImportError:
        raise DcncError("--backend tensorrt needs polygraphy: pip install polygraphy") from None
    import torch

    if not torch.cuda.is_available():
        raise DcncError(
            "--backend tensorrt needs an NVIDIA GPU visible to torch (dcnc keeps engine buffers in torch CUDA"
            " tensors): torch.cuda.is_available() is False here; install a CUDA build of torch on a GPU machine"
        )
    return trt.__version__


def gpu_identity(device_id: int = 0) -> dict:
    """What an engine (and a timing cache) is tied to: the GPU's name and compute capability, and CUDA's version."""
    import torch

    major, minor = torch.cuda.get_device_capability(device_id)
    return {
        "name": torch.cuda.get_device_name(device_id),
        "compute_capability": f"{major}.{minor}",
        "cuda": torch.version.cuda,
    }


def timing_cache_key(device_id: int = 0) -> dict:
    """The key a timing cache is valid under: TensorRT version and GPU (tactic timings mean nothing elsewhere)."""
    identity = gpu_identity(device_id)
    return {"tensorrt": _tensorrt().__version__, "gpu": identity["name"], "compute_capability": identity["compute_capability"]}


def prepare_timing_cache(path: Path, key: dict) -> str:
    """Make `path` a timing cache valid for `key`: keep it if its recorded key matches, else delete it so the
    build starts a fresh one (a cache whose key does not match is rebuilt, never trusted). Returns what happened."""
    key_path = path.with_name(path.name + ".key.json")
    if not path.exists():
        outcome = "new"
    else:
        try:
            recorded = json.loads(key_path.read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded == key:
            return "reused"
        path.unlink()
        outcome = "rebuilt (its key did not match)"
    write_json(key_path, key, sort_keys=True)
    return outcome


def build_engine(
    onnx_path: Path, engine_path: Path, inputs: list[dict], batch: tuple[int, int, int], options: TrtOptions,
    timing_cache: Path,
) -> dict:
    """Parse `onnx_path` into a strongly typed network, build an engine for the batch profile, write it to
    `engine_path`, and merge new tactic timings into `timing_cache` (prepared by prepare_timing_cache).

    Returns the inspector's summary: {"layers": [...], "aux_streams": int, "precisions": {precision: count}}.
    """
    trt = _tensorrt()
    import torch
    from polygraphy.backend.trt import EngineBytesFromNetwork, NetworkFromOnnxPath
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    torch.cuda.set_device(options.device_id)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    config = create_config(options, optimization_profile(inputs, batch), str(timing_cache) if timing_cache.exists() else None)
    try:
        engine_bytes = EngineBytesFromNetwork(network, config=config, save_timing_cache=str(timing_cache))()
    except PolygraphyException as err:
        first = first_line(err, "see TensorRT's log above")
        raise DcncError(f"{onnx_path}: TensorRT {trt.__version__} could not build an engine ({first})") from None
    fileio.write_all(engine_path, bytes(engine_bytes))  # inside the bundle's staging: a full disk is one line
    return inspect_engine(deserialize_engine(engine_path.read_bytes(), options))


def deserialize_engine(engine_bytes: bytes, options: TrtOptions):
    """trt.ICudaEngine from a serialized plan; version-compatible plans carry a lean runtime that must be allowed."""
    trt = _tensorrt()
    from polygraphy.backend.trt import util as trt_util

    runtime = trt.Runtime(trt_util.get_trt_logger())
    if options.version_compatible:
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise DcncError(f"TensorRT {trt.__version__} could not deserialize the engine (built by another version or GPU?)")
    return engine


class EngineFromPath:
    """Loader: calling it deserializes the engine at `path` with the options it was built with."""

    def __init__(self, path: str | Path, options: TrtOptions | None = None):
        self.path = Path(path)
        self.options = options or TrtOptions()

    def __call__(self):
        return deserialize_engine(self.path.read_bytes(), self.options)


def layer_precision(layer: dict) -> str:
    """fp32 / fp16 / bf16 / int8 / fp8 / int32 / int64 / bool from a layer's first output 'Format/Datatype';
    "mixed" for a Myelin layer ("{ForeignNode[first...last]}"): a whole subgraph TensorRT's compiler fused, whose
    first output's type says nothing of what runs inside it (a mostly FP16 subgraph ending in an FP32 cast)."""
    if layer.get("LayerType") == "Myelin" or str(layer.get("Name", "")).startswith("{ForeignNode["):
        return "mixed"
    tensors = layer.get("Outputs") or layer.get("Inputs") or []
    text = str(tensors[0].get("Format/Datatype", "")) if tensors and isinstance(tensors[0], dict) else ""
    lowered = text.lower()
    for token, precision in (
        ("fp8", "fp8"), ("int8", "int8"), ("bf16", "bf16"), ("bfloat", "bf16"), ("fp16", "fp16"), ("half", "fp16"),
        ("fp32", "fp32"), ("float", "fp32"), ("int32", "int32"), ("int64", "int64"), ("bool", "bool"),
    ):
        if token in lowered:
            return precision
    return "unknown"


def inspect_engine(engine) -> dict:
    """The engine inspector's layer list (name, type, precision, tactic), the count of layers per precision
    (fused Myelin subgraphs as "mixed": layer_precision) and how many aux streams the engine uses."""
    trt = _tensorrt()
    inspector = engine.create_engine_inspector()
    information = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = []
    for layer in information.get("Layers", []):
        if isinstance(layer, str):  # profiling verbosity below DETAILED gives names only
            layers.append({"name": layer, "type": "unknown", "precision": "unknown"})
            continue
        layers.append(
            {
                "name": layer.get("Name", ""),
                "type": layer.get("LayerType", ""),
                "precision": layer_precision(layer),
                "tactic": layer.get("TacticName", layer.get("TacticValue", "")),
            }
        )
    precisions: dict[str, int] = {}
    for layer in layers:
        precisions[layer["precision"]] = precisions.get(layer["precision"], 0) + 1
    return {"layers": layers, "aux_streams": int(engine.num_aux_streams), "precisions": precisions}
