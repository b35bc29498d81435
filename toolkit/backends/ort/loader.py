"""ONNX Runtime sessions tuned for the target: session options, CUDA provider options, and the saved optimised graph.

CPU: the sequential executor with intra-op threads = usable cores (ORT's parallel executor is deprecated on CPU
and measured 2x slower here). CUDA: the CUDA execution provider on one device, optionally with CUDA graphs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from toolkit.core.errors import DcncError, first_line

OPT_LEVELS = ("disable", "basic", "extended", "all")
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class OrtOptions:
    """Session settings recorded in the manifest and re-applied when the bundle is opened.

    Args:
        threads: intra-op threads; None (default) = usable cores at session creation.
        opt_level: ORT graph optimisation level, one of OPT_LEVELS (default "all").
        device_id: CUDA device for `ort-cuda` (default 0).
        cuda_graph: capture CUDA graphs in `ort-cuda` (one per batch size; needs every node on the CUDA EP).
    """

    threads: int | None = None
    opt_level: str = "all"
    device_id: int = 0
    cuda_graph: bool = False

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
    """The onnxruntime version, if it has the CUDA execution provider; DcncError saying how to get it if not."""
    ort = _onnxruntime()
    available = ort.get_available_providers()
    if CUDA_PROVIDER not in available:
        raise DcncError(
            f"--backend ort-cuda needs onnxruntime-gpu (this onnxruntime {ort.__version__} offers {available}):"
            " install onnxruntime-gpu in a separate environment (it replaces the CPU onnxruntime package)"
        )
    return ort.__version__


def session_options(
    options: OrtOptions, optimized_model_path: Path | None = None, preoptimized: bool = False, spinning: bool = True
):
    """onnxruntime.SessionOptions: sequential executor, intra-op threads, optimisation level.

    `optimized_model_path` makes the session write its optimised graph there; `preoptimized` (the model is such
    a graph) turns graph optimisation off so it is not redone at every load. `spinning=False` for sessions timed
    in turn with others: an idle session's spinning intra-op threads steal the cores from the one being timed
    (measured on 2 cores: up to 10x distortions).
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
    so.log_severity_level = 3  # errors only: ORT's warnings about the saved graph would drown the CLI
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def providers(backend: str, options: OrtOptions) -> list:
    """Execution providers in priority order, with the CUDA provider's options for `ort-cuda`."""
    if backend == "ort":
        return [CPU_PROVIDER]
    cuda = {"device_id": str(options.device_id), "enable_cuda_graph": "1" if options.cuda_graph else "0"}
    return [(CUDA_PROVIDER, cuda), CPU_PROVIDER]


class SessionFromOnnx:
    """Loader: calling it creates an onnxruntime.InferenceSession for `path` (polygraphy-style: args now, work later).

    Args:
        path: the ONNX file.
        backend: "ort" or "ort-cuda".
        options: OrtOptions (default: OrtOptions()).
        optimized_model_path: where the session saves its optimised graph (default: not saved).
        preoptimized: `path` is already an ORT-optimised graph, so optimisation is off (default False).
    """

    def __init__(
        self,
        path: str | Path,
        backend: str = "ort",
        options: OrtOptions | None = None,
        optimized_model_path: Path | None = None,
        preoptimized: bool = False,
    ):
        self.path = Path(path)
        self.backend = backend
        self.options = options or OrtOptions()
        self.optimized_model_path = optimized_model_path
        self.preoptimized = preoptimized

    def __call__(self):
        ort = _onnxruntime()
        if self.backend == "ort-cuda":
            require_cuda_provider()
        so = session_options(self.options, self.optimized_model_path, self.preoptimized)
        try:
            session = ort.InferenceSession(str(self.path), sess_options=so, providers=providers(self.backend, self.options))
        except Exception as err:  # onnxruntime raises its own untyped errors (Fail, InvalidGraph, ...)
            if self.options.cuda_graph and "CUDA Graph" in str(err):
                # Some node fell back to the CPU provider, so this model cannot be captured: run it uncaptured.
                retry = SessionFromOnnx(
                    self.path, self.backend, OrtOptions(**{**self.options.to_dict(), "cuda_graph": False}),
                    self.optimized_model_path, self.preoptimized,
                )
                return retry()
            first = first_line(err)
            raise DcncError(f"{self.path}: onnxruntime cannot load it ({first})") from None
        if self.backend == "ort-cuda" and session.get_providers()[0] != CUDA_PROVIDER:
            raise DcncError(
                f"{self.path}: onnxruntime-gpu found no usable CUDA device {self.options.device_id}"
                f" (the session fell back to {session.get_providers()})"
            )
        return session


def session_from_onnx(path: str | Path, backend: str = "ort", options: OrtOptions | None = None, **kwargs):
    """Eager form of SessionFromOnnx."""
    return SessionFromOnnx(path, backend, options, **kwargs)()


def save_optimized_graph(onnx_path: Path, out_path: Path, backend: str, options: OrtOptions) -> None:
    """Write ORT's optimised graph of `onnx_path` to `out_path`. The result is tied to this onnxruntime version,
    provider and CPU (layouts and fused kernels are chosen for them), so the manifest marks it non-portable."""
    SessionFromOnnx(onnx_path, backend, options, optimized_model_path=out_path)()
    if not out_path.is_file():
        raise DcncError(f"{onnx_path}: onnxruntime did not write its optimised graph to {out_path}")
