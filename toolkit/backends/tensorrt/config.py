"""TensorRT build settings: the options dcnc exposes, the optimisation profile from `--batch`, and the builder config.

Precision is not set here: the network is strongly typed, so the lowered ONNX decides it (TensorRT 11 removed
BuilderFlag.FP16/INT8 and calibrators). TF32 stays off (TensorRT's builder turns it on by default; polygraphy's
CreateConfig clears it unless tf32=True) so an fp32 engine computes in fp32, as verified on CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from toolkit.core.errors import DcncError

HARDWARE_COMPAT = {
    "none": "NONE",
    "ampere_plus": "AMPERE_PLUS",
    "same_compute_capability": "SAME_COMPUTE_CAPABILITY",
}


@dataclass(frozen=True)
class TrtOptions:
    """TensorRT builder and runner options, recorded in the manifest.

    Args:
        opt_level: builder optimisation level 0-5 (default 3, TensorRT's own default; higher builds longer).
        max_aux_streams: auxiliary streams the engine may use so independent branches (cross and deep) run
            concurrently (default 2); None lets TensorRT's heuristics decide.
        version_compatible: build an engine later TensorRT versions of the same major can run (default False).
        hardware_compat: one of HARDWARE_COMPAT: "none" (default) ties the engine to this GPU's compute
            capability; "ampere_plus" runs on any Ampere or newer GPU.
        workspace_mib: cap on the builder's workspace memory pool in MiB (default: TensorRT's, the device memory).
        device_id: the CUDA device to build and run on (default 0).
        cuda_graph: the runner captures one CUDA graph per batch size and replays it (default False).
        allow_tf32: let FP32 layers compute in TF32 (default False: inputs rounded to 10-bit mantissas, which the
            fp32 gates and the FP32 torch reference do not expect).
    """

    opt_level: int = 3
    max_aux_streams: int | None = 2
    version_compatible: bool = False
    hardware_compat: str = "none"
    workspace_mib: int | None = None
    device_id: int = 0
    cuda_graph: bool = False
    allow_tf32: bool = False

    def __post_init__(self):
        if not 0 <= self.opt_level <= 5:
            raise DcncError(f"--trt-opt-level {self.opt_level}: must be in 0..5")
        if self.max_aux_streams is not None and self.max_aux_streams < 0:
            raise DcncError(f"--max-aux-streams {self.max_aux_streams}: must be 0 or more")
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise DcncError(f"--hardware-compat {self.hardware_compat!r}: choose one of {', '.join(HARDWARE_COMPAT)}")
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise DcncError(f"--workspace {self.workspace_mib}: must be at least 1 MiB")
        if self.device_id < 0:
            raise DcncError(f"--device-id {self.device_id}: must be 0 or more")

    def to_dict(self) -> dict:
        return asdict(self)


def optimization_profile(inputs: list[dict], batch: tuple[int, int, int]):
    """polygraphy Profile: every input's leading (batch) dim ranges over `batch` = (min, opt, max).

    `inputs` are manifest tensor entries ({"name", "shape"}); only the batch may be dynamic.
    """
    from polygraphy.backend.trt import Profile

    profile = Profile()
    for tensor in inputs:
        shape = tensor["shape"]
        rest = shape[1:]
        if not shape or not isinstance(shape[0], str) or not all(isinstance(d, int) for d in rest):
            raise DcncError(
                f"input {tensor['name']} has shape {shape}: TensorRT profiles need a dynamic batch dim first"
                " and fixed dims after it"
            )
        low, opt, high = ([b, *rest] for b in batch)
        profile.add(tensor["name"], min=low, opt=opt, max=high)
    return profile


def create_config(options: TrtOptions, profile, timing_cache_path: str | None):
    """polygraphy CreateConfig: profile, timing cache, optimisation level, aux streams, compatibility,
    DETAILED profiling verbosity (so the engine inspector reports each layer's precision). No precision flags;
    TF32 only with `allow_tf32`."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig

    hardware = getattr(trt.HardwareCompatibilityLevel, HARDWARE_COMPAT[options.hardware_compat], None)
    if hardware is None:
        raise DcncError(f"--hardware-compat {options.hardware_compat}: not offered by TensorRT {trt.__version__}")
    pools = None
    if options.workspace_mib is not None:
        pools = {trt.MemoryPoolType.WORKSPACE: options.workspace_mib << 20}
    return CreateConfig(
        profiles=[profile],
        tf32=options.allow_tf32,
        load_timing_cache=timing_cache_path,
        builder_optimization_level=options.opt_level,
        max_aux_streams=options.max_aux_streams,
        version_compatible=options.version_compatible or None,
        hardware_compatibility_level=hardware if options.hardware_compat != "none" else None,
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
        memory_pool_limits=pools,
    )
