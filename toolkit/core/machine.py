"""The machine dcnc runs on, described once: usable cores, the CPU and the ISA extensions kernels depend on, the
versions of the libraries that compute, and the GPU when timing on CUDA. Bundles record it (an ORT-optimised
graph is tied to its CPU); reports name it beside every figure."""

from __future__ import annotations

import importlib
import os
import platform
from pathlib import Path
from typing import Any

# CPU features that change which kernels ONNX Runtime and torch pick (so what an optimised graph holds, and how
# fast INT8 runs: VNNI / AMX accumulate u8 x s8 products in int32).
ISA_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_int8", "amx_bf16",
)  # fmt: skip
# import name -> reported name; a module's own __version__ is what runs (onnxruntime-gpu installs as onnxruntime
# beside a CPU onnxruntime's metadata, so the package metadata can name the wrong one)
LIBRARIES = {"numpy": "numpy", "torch": "torch", "onnx": "onnx", "onnxruntime": "onnxruntime",
             "tensorrt": "tensorrt", "faiss": "faiss-cpu"}  # fmt: skip


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cpu_identity() -> dict[str, Any]:
    """The CPU's model name, the cores this process may use, and which of ISA_FLAGS it has."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
            if flags and name:
                break
    except OSError:  # pragma: no cover - not Linux
        pass
    return {"cpu": name, "cores": usable_cores(), "isa": [f for f in ISA_FLAGS if f in flags]}


def library_versions() -> dict[str, str]:
    """The installed version of each library in LIBRARIES that imports here (absent ones are left out)."""
    versions = {}
    for module, name in LIBRARIES.items():
        try:
            versions[name] = importlib.import_module(module).__version__
        except ImportError:
            continue
    return versions


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where numbers were measured: host, platform, CPU (model, usable cores, ISA), logical CPUs, Python, library
    versions, and the GPU when `device` is cuda."""
    cpu = cpu_identity()
    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": cpu["cpu"],
        **cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": library_versions(),
    }
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info
