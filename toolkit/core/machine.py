"""The machine dcnc runs on, described once: usable cores, the CPU and the ISA extensions kernels depend on, the
versions of the libraries that compute, and the GPU when timing on CUDA. Bundles record it (an ORT-optimised
graph is tied to its CPU); reports name it beside every figure."""

from __future__ import annotations

import importlib
import os
import platform
import time
from dataclasses import asdict, dataclass
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
    """Cores this process may run on: the affinity mask, capped by a cgroup CPU quota (a container given 2 CPUs of
    a 64-core host may run on all 64, but only for 2 cores' worth of time)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    return max(1, min(cores, int(quota))) if quota is not None else cores


def cpu_quota() -> float | None:
    """The cgroup CPU quota in cores (cgroup v2 cpu.max, or v1 cfs_quota/period), None when unlimited or unknown."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        quota, period = (text[0], text[1]) if len(text) == 2 else ("max", "1")
    except OSError:
        try:
            quota = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text().strip()
            period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1") or not quota.lstrip("-").isdigit() or not period.isdigit() or int(period) == 0:
        return None
    return int(quota) / int(period)


def busy_cores(seconds: float = 0.25) -> float | None:
    """How many of this process's cores other work keeps busy right now: /proc/stat's per-CPU counters sampled
    `seconds` apart (this process sleeps meanwhile, so what is busy is someone else). None where unknown."""

    def sample() -> dict[str, tuple[int, int]]:
        counters = {}
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                values = [int(v) for v in fields]
                idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
                counters[name] = (sum(values[:8]), idle)
        return counters

    try:
        cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        before = sample()
        time.sleep(seconds)
        after = sample()
    except (OSError, ValueError, AttributeError):  # pragma: no cover - not Linux
        return None
    busy = 0.0
    for cpu in cpus & set(before) & set(after):
        total = after[cpu][0] - before[cpu][0]
        idle = after[cpu][1] - before[cpu][1]
        busy += (total - idle) / total if total > 0 else 0.0
    return busy


@dataclass(frozen=True)
class MachineLoad:
    """How shared the machine is when timing starts, and the threads timed code gets so it does not fight the
    other work for cores (threads that busy-wait collapse when a core is taken: measured 100x p50 swings)."""

    cores: int  # usable_cores()
    busy: float | None  # cores other work kept busy at the start (busy_cores)
    load_average: float | None  # 1-minute load average, for the report
    threads: int  # intra-op threads for torch and ONNX Runtime

    @property
    def shared(self) -> bool:
        return self.busy is not None and self.busy >= 0.5

    def describe(self) -> str:
        busy = "unknown" if self.busy is None else f"{self.busy:.1f} of {self.cores} cores busy"
        load = "" if self.load_average is None else f", load average {self.load_average:.2f}"
        return f"{busy}{load}; {self.threads} thread(s)"

    def to_dict(self) -> dict:
        return asdict(self) | {"shared": self.shared}


def machine_load(threads: int | None = None) -> MachineLoad:
    """The load now, and `threads` (default: the usable cores other work leaves free, at least 1)."""
    cores, busy = usable_cores(), busy_cores()
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not Unix
        load = None
    free = cores if busy is None else max(1, round(cores - busy))
    return MachineLoad(cores, busy, load, threads or free)


def quiet_openmp() -> None:
    """When the machine is shared, have OpenMP (torch's intra-op pool) sleep instead of spin while it waits:
    spinning threads steal the cores another process needs and then stall themselves. Only takes effect before
    torch is imported (OpenMP reads it at start), so the CLI calls it first; an explicit setting is kept."""
    if "OMP_WAIT_POLICY" not in os.environ and machine_load().shared:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


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
