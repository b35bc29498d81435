"""Backends dcnc builds for and runs on: ONNX Runtime on CPU (`ort`) and CUDA (`ort-cuda`), and TensorRT.

Each lives in its own folder (`ort/`, `tensorrt/`) with a loader (builds or opens the artifact) and a runner;
`torch_runner` runs the original module as the reference. Heavy packages are imported only when used.
"""

from __future__ import annotations

BACKENDS = ("ort", "ort-cuda", "tensorrt")


def require_backend(backend: str) -> None:
    """Raise DcncError saying which package or device is missing (and how to get it) if `backend` cannot run here."""
    from toolkit.core.errors import DcncError

    if backend == "ort":
        from toolkit.backends.ort.loader import require_onnxruntime

        require_onnxruntime()
    elif backend == "ort-cuda":
        from toolkit.backends.ort.loader import require_cuda_provider

        require_cuda_provider()
    elif backend == "tensorrt":
        from toolkit.backends.tensorrt.loader import require_tensorrt

        require_tensorrt()
    else:
        raise DcncError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
