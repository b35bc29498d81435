"""ONNX Runtime sessions tuned for the target: session options, CUDA provider options, and the saved optimised graph.

CPU: the sequential executor with intra-op threads = usable cores (ORT's parallel executor is deprecated on CPU
and measured 2x slower here). CUDA: the CUDA execution provider on one device, FP32 math without TF32 unless
allowed, optionally with CUDA graphs.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from toolkit.core.errors import DcncError, first_line
from toolkit.core.logcapture import ort_log_severity
from toolkit.core.machine import usable_cores

OPT_LEVELS = ("disable", "basic", "extended", "all")
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
# How onnxruntime refuses CUDA graphs for a model with nodes off the CUDA provider (or control flow): "This session
# cannot use the graph capture feature as requested by the user as all compute graph nodes have not been
# partitioned to the CUDAExecutionProvider" (1.17 and later; "the CUDA Graph feature ... the CUDA EP" before).
CUDA_GRAPH_REFUSAL = re.compile(r"cannot use the (graph capture|CUDA Graph) feature", re.IGNORECASE)


class CudaGraphRefused(DcncError):
    """onnxruntime cannot capture this model in CUDA graphs (a node runs off the CUDA provider, or control flow)."""


@dataclass(frozen=True)
class OrtOptions:
    """Session settings recorded in the manifest and re-applied when the bundle is opened.

    Args:
        threads: intra-op threads; None (default) = usable cores at session creation.
        opt_level: ORT graph optimisation level, one of OPT_LEVELS (default "all").
        device_id: CUDA device for `ort-cuda` (default 0).
        cuda_graph: capture CUDA graphs in `ort-cuda` (one per batch size; needs every node on the CUDA EP).
        allow_tf32: let `ort-cuda` compute FP32 MatMul / Gemm in TF32 (default False). The CUDA provider's own
            default is on (`use_tf32`), which rounds their inputs to 10-bit mantissas: rel L2 1e-4 to 3e-3 on the
            example towers, over the fp32 gate of 1e-4, and not what the torch reference computes.
    """

    threads: int | None = None
    opt_level: str = "all"
    device_id: int = 0
    cuda_graph: bool = False
    allow_tf32: bool = False

    def __post_init__(self):
        if self.opt_level not in OPT_LEVELS:
            raise DcncError(f"--ort-opt-level {self.opt_level!r}: choose one of {', '.join(OPT_LEVELS)}")
        if self.threads is not None and self.threads < 1:
            raise DcncError(f"--threads {self.threads}: must be at least 1")
        if self.device_id < 0:
            raise DcncError(f"--device-id {self.device_id}: must be 0 or more")

    def to_dict(self) -> dict:
        return asdict(self)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise DcncError("the ort backend needs onnxruntime: pip install onnxruntime") from None
    return onnxruntime


def require_onnxruntime() -> str:
    """The installed onnxruntime version; DcncError if it is missing."""
    return _onnxruntime().__version__


def require_cuda_provider() -> str:
    """The onnxruntime version, if it has the CUDA execution provider; DcncError saying how to get it if not.

    torch is imported first: it loads the CUDA runtime, cuBLAS and cuDNN of its nvidia wheels into the process,
    where the CUDA provider finds them when its library is loaded. onnxruntime.preload_dlls() looks for them only
    beside onnxruntime on Linux (<onnxruntime>/../nvidia/cu13/lib for CUDA 13), so it finds nothing when
    onnxruntime-gpu was installed apart from torch's environment (pip --target)."""
    import torch  # noqa: F401  (see above)

    ort = _onnxruntime()
    available = ort.get_available_providers()
    if CUDA_PROVIDER not in available:
        raise DcncError(
            f"--backend ort-cuda needs onnxruntime-gpu (this onnxruntime {ort.__version__} offers {available}):"
            " install onnxruntime-gpu in a separate environment (it replaces the CPU onnxruntime package)"
        )
    return ort.__version__


def session_options(
    options: OrtOptions,
    optimized_model_path: Path | None = None,
    preoptimized: bool = False,
    spinning: bool = True,
    profile_prefix: str | None = None,
):
    """onnxruntime.SessionOptions: sequential executor, intra-op threads, optimisation level.

    `optimized_model_path` makes the session write its optimised graph there; `preoptimized` (the model is such
    a graph) turns graph optimisation off so it is not redone at every load. `spinning=False` for sessions timed
    in turn with others: an idle session's spinning intra-op threads steal the cores from the one being timed
    (measured on 2 cores: up to 10x distortions). `profile_prefix`: write ORT's per-node profile (JSON) there.
    """
    ort = _onnxruntime()
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = options.threads or usable_cores()
    so.inter_op_num_threads = 1  # only the parallel executor uses inter-op threads
    so.graph_optimization_level = levels["disable" if preoptimized else options.opt_level]
    # fatal only unless --verbose: ORT's errors come back as exceptions that dcnc words in one line, and its
    # warnings (about a saved graph, say) or printed errors would come before that line
    so.log_severity_level = ort_log_severity()
    ort.set_default_logger_severity(ort_log_severity())
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def providers(backend: str, options: OrtOptions) -> list:
    """Execution providers in priority order, with the CUDA provider's options for `ort-cuda`."""
    if backend == "ort":
        return [CPU_PROVIDER]
    cuda = {
        "device_id": str(options.device_id),
        "enable_cuda_graph": "1" if options.cuda_graph else "0",
        "use_tf32": "1" if options.allow_tf32 else "0",
    }
    return [(CUDA_PROVIDER, cuda), CPU_PROVIDER]


def captures_cuda_graphs(session) -> bool:
    """Whether a session runs under CUDA graphs (what its CUDA provider was actually given)."""
    return session.get_provider_options().get(CUDA_PROVIDER, {}).get("enable_cuda_graph") == "1"


def ort_session(
    model,
    backend: str = "ort",
    options: OrtOptions | None = None,
    *,
    spinning: bool = True,
    optimized_model_path: Path | None = None,
    preoptimized: bool = False,
    profile_prefix: str | None = None,
    where: str | None = None,
):
    """The one place dcnc opens an onnxruntime.InferenceSession.

    Args:
        model: an ONNX file path, serialized bytes, or an onnx.ModelProto.
        backend: "ort" (CPU) or "ort-cuda".
        options: OrtOptions (default OrtOptions(): all optimisations, threads = usable cores).
        spinning: False for sessions timed in turn with others (see session_options).
        optimized_model_path / preoptimized / profile_prefix: see session_options.
        where: names the model in errors (default: the path, or "graph").

    Raises DcncError in one line when onnxruntime cannot load the model or (ort-cuda) runs it off the GPU;
    CudaGraphRefused when `options.cuda_graph` asks for CUDA graphs that onnxruntime cannot capture for it.
    """
    ort = _onnxruntime()
    options = options or OrtOptions()
    if backend == "ort-cuda":
        require_cuda_provider()
    if isinstance(model, (str, Path)):
        source, where = str(model), where or str(model)
    else:
        source, where = (model if isinstance(model, bytes) else model.SerializeToString()), where or "graph"
    so = session_options(options, optimized_model_path, preoptimized, spinning, profile_prefix)
    try:
        session = ort.InferenceSession(source, sess_options=so, providers=providers(backend, options))
    except Exception as err:  # onnxruntime raises its own untyped errors (Fail, InvalidGraph, ...)
        if options.cuda_graph and CUDA_GRAPH_REFUSAL.search(str(err)):
            raise CudaGraphRefused(f"{where}: onnxruntime cannot capture it in CUDA graphs ({first_line(err)})") from None
        raise DcncError(f"{where}: onnxruntime cannot load it ({first_line(err)})") from None
    if backend == "ort-cuda" and session.get_providers()[0] != CUDA_PROVIDER:
        raise DcncError(
            f"{where}: onnxruntime-gpu found no usable CUDA device {options.device_id}"
            f" (the session fell back to {session.get_providers()})"
        )
    return session


class SessionFromOnnx:
    """Loader: calling it opens the session (polygraphy-style: arguments now, work later); see ort_session."""

    def __init__(self, model, backend: str = "ort", options: OrtOptions | None = None, **kwargs):
        self.model, self.backend, self.options, self.kwargs = model, backend, options, kwargs

    def __call__(self):
        return ort_session(self.model, self.backend, self.options, **self.kwargs)


def tap_outputs(model, tensors: list[str]):
    """A copy of `model` (onnx.ModelProto) in which each tensor in `tensors` is also a graph output (typed
    float32, shape left to onnxruntime), so one run returns every activation asked for."""
    import onnx

    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    present = {o.name for o in tapped.graph.output}
    tapped.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in tensors if name not in present
    )
    return tapped


def save_optimized_graph(onnx_path: Path, out_path: Path, backend: str, options: OrtOptions) -> None:
    """Write ORT's optimised graph of `onnx_path` to `out_path`. The result is tied to this onnxruntime version,
    provider and CPU (layouts and fused kernels are chosen for them), so the manifest marks it non-portable."""
    ort_session(onnx_path, backend, options, optimized_model_path=out_path)
    if not out_path.is_file():
        raise DcncError(f"{onnx_path}: onnxruntime did not write its optimised graph to {out_path}")
