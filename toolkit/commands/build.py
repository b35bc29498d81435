"""`dcnc build`: lower exported tower graphs to a precision and build them into one bundle for a backend.

Every argument is checked before anything is written; the bundle is assembled in a temporary directory beside
the output and renamed into place only when complete, so a failed build leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from toolkit.backends import BACKENDS, require_backend
from toolkit.backends.bundle import (
    MANIFEST,
    Manifest,
    TowerEntry,
    device_identity,
    installed_versions,
    write_manifest,
)
from toolkit.commands.calibration_data import (
    calibration_data,
    check_source,
    source_files,
    source_identity,
)
from toolkit.commands.int8_search import embedding_tower
from toolkit.core.errors import DcncError
from toolkit.core.fileio import atomic_dir, sha256_file
from toolkit.core.onnxio import (
    external_data_locations,
    graph_inputs,
    graph_outputs,
    load_onnx,
    save_onnx,
    tensor_entries,
    weight_digests,
)
from toolkit.core.paths import DIR, check_outputs, output

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DEFAULT_BATCH = (1, 256, 4096)
TIMING_CACHE = "timing.cache"



def batch_profile(requested: tuple[int, int, int] | None, towers: dict[str, Path]) -> tuple[int, int, int]:
    """The bundle's batch profile: `requested` (None: DEFAULT_BATCH); for tower graphs whose inputs all have a
    fixed first dimension N, the one batch they take (N:N:N), where a requested profile other than that is
    refused (the manifest must not promise batches the graph cannot run)."""
    fixed: dict[int, str] = {}
    for tower, path in towers.items():
        firsts = [s.shape[0] if s.shape else None for s in graph_inputs(load_onnx(path, external_data=False))]
        if firsts and all(isinstance(d, int) for d in firsts):
            if len(set(firsts)) > 1:
                raise DcncError(f"{path}: its inputs have different fixed batches {sorted(set(firsts))}")
            fixed.setdefault(firsts[0], tower)
    if len(fixed) > 1:
        shown = ", ".join(f"{tower} {size}" for size, tower in fixed.items())
        raise DcncError(f"the towers have different fixed batches ({shown}); build them into separate bundles")
    if not fixed:
        return requested or DEFAULT_BATCH
    size, tower = next(iter(fixed.items()))
    if requested not in (None, (size, size, size)):
        raise DcncError(
            f"--batch {':'.join(map(str, requested))}: {towers[tower]} has a fixed batch of {size} (its inputs' first"
            f" dimension); build it with --batch {size}, or export it with a dynamic batch"
        )
    return size, size, size


def parse_batch(text: str) -> tuple[int, int, int]:
    """`MIN:OPT:MAX` (or one `N` for a fixed batch) -> (min, opt, max), with 1 <= min <= opt <= max."""
    parts = text.split(":")
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise DcncError(f"--batch {text!r}: expected MIN:OPT:MAX positive integers, e.g. 1:256:4096")
    low, opt, high = (int(p) for p in parts)
    if not 1 <= low <= opt <= high:
        raise DcncError(f"--batch {text!r}: needs 1 <= MIN <= OPT <= MAX")
    return low, opt, high


@dataclass(frozen=True)
class Lowering:
    """How `dcnc build` decides a tower's precision in its ONNX (DESIGN.md decision 1).

    fp32: the exported graph as is. fp16 / bf16: graphs.precision.lower_half, whose FP32 block list comes from
    the calibration data when there is some (else its conservative default: cross branch and head FP32).
    int8: Q/DQ from calibration (required) for `target` ("cpu": U8S8 for ONNX Runtime, "tensorrt": symmetric),
    with `calib_method` ranges; `keep_fp32` names nodes left in float (e.g. from `dcnc calibrate --eval`). For
    the cpu target, weights keep the bits `int8_isa` allows (default: this CPU's level) and the lowering is
    searched for held-out agreement >= `min_agreement` (default 0.99; 0: plain INT8, nothing kept FP32).
    """

    precision: str
    target: str = "cpu"
    calib_method: str = "minmax"
    calib_samples: int | None = None
    seed: int = 0
    keep_fp32: tuple[str, ...] = ()
    int8_isa: str | None = None
    min_agreement: float | None = None

    def check(self, calib, calib_resolved: bool = True) -> None:
        """Refuse option combinations that mean nothing, before anything is read or written: the one place these
        rules live (`dcnc build`, `dcnc run`'s pipeline targets and `dcnc bench` all ask here).

        calib_resolved=False: the calibration source is not known yet (a pipeline target before its model's
        checkpoint is read), so only the rules that do not depend on it are checked."""
        if self.precision not in PRECISIONS:
            raise DcncError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.precision == "int8" and calib is None and calib_resolved:
            raise DcncError("int8 needs calibration data (--calib DATA, or calib in a pipeline file)")
        if calib is not None and self.precision == "fp32":
            raise DcncError("--calib is used by --precision fp16, bf16 and int8, not fp32")
        int8_only = self.keep_fp32 or self.calib_method != "minmax" or self.int8_isa or self.min_agreement is not None
        if self.precision != "int8" and int8_only:
            raise DcncError("--calib-method, --keep-fp32, --int8-isa and --min-agreement apply to --precision int8 only")
        if self.precision == "int8":
            from calibration.isa import check_isa
            from calibration.qdq import check_target
            from calibration.ranges import check_method

            check_target(self.target)
            check_method(self.calib_method)
            if self.target != "cpu" and (self.int8_isa or self.min_agreement is not None):
                raise DcncError("--int8-isa and --min-agreement apply to the cpu int8 target (ONNX Runtime's kernels)")
            if self.int8_isa:
                check_isa(self.int8_isa)
            if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
                raise DcncError(f"--min-agreement {self.min_agreement}: must be in [0, 1] (0: plain INT8)")

    def __call__(self, model, calib, tower: str, embedding_towers: int = 1, timing_batch: int | None = None, say=None):
        """(lowered model, record of what the lowering did, or None for fp32), `calib` the build's calibration
        source (toolkit.commands.calibration_data) of which `tower`'s rows are used. embedding_towers /
        timing_batch / say: the cpu int8 search's budget split, timed batch and progress lines
        (toolkit.commands.int8_search)."""
        if self.precision == "fp32":
            return model, None
        data = None
        if calib is not None:
            data = calibration_data(calib, tower, graph_inputs(model), self.calib_samples, self.seed)
        if self.precision == "int8":
            from calibration.int8 import quantize_int8
            from toolkit.commands.int8_search import DEFAULT_MIN_AGREEMENT, canonical, searched_int8

            keep = [n for n in self.keep_fp32 if n in {node.name for node in model.graph.node}]
            if self.target != "cpu":
                return quantize_int8(model, data, self.calib_method, self.target, keep)
            if not self.keep_fp32:  # names the user gave stay as they are
                model = canonical(model)
            target = DEFAULT_MIN_AGREEMENT if self.min_agreement is None else self.min_agreement
            return searched_int8(model, data, tower, self.calib_method, self.int8_isa, target, embedding_towers,
                                 keep, self.seed, timing_batch, say)  # fmt: skip
        from calibration.cache import calibrated_ranges
        from graphs.precision import lower_half

        if data is None:
            return lower_half(model, self.precision)
        ranges, _, _, samples = calibrated_ranges(model, data)
        return lower_half(model, self.precision, ranges.peaks(), samples)

    def to_dict(self) -> dict:
        return asdict(self)


def find_towers(model: Path) -> dict[str, Path]:
    """Tower name -> ONNX file: one `.onnx` file is one tower named by its stem; a directory holds `<tower>.onnx`."""
    if not model.exists():
        raise DcncError(f"{model}: not found (expected an ONNX file or a directory of <tower>.onnx)")
    if model.is_file():
        if model.suffix != ".onnx":
            raise DcncError(f"{model}: expected a .onnx file or a directory of them")
        return {model.stem: model}
    towers = {p.stem: p for p in sorted(model.glob("*.onnx"))}
    if not towers:
        raise DcncError(f"{model}: directory holds no <tower>.onnx files")
    return towers


def source_sha256(path: Path) -> str:
    """Hash of an ONNX file together with the external data files its initializers point to."""
    digest = hashlib.sha256(sha256_file(path).encode())
    try:
        model = load_onnx(path, external_data=False)
    except DcncError:  # unreadable: the build reports it; the file's own hash still identifies it
        return digest.hexdigest()
    for location in external_data_locations(model):
        data = path.parent / location
        if data.is_file():
            digest.update(location.encode() + b"\0" + sha256_file(data).encode())
    return digest.hexdigest()


def build_bundle(
    model: str | Path,
    out: str | Path,
    backend: str = "ort",
    precision: str = "fp32",
    calib: str | Path | None = None,
    batch: tuple[int, int, int] | None = None,
    force: bool = False,
    ort_options=None,
    trt_options=None,
    save_optimized: bool = False,
    timing_cache: str | Path | None = None,
    int8_target: str | None = None,
    calib_method: str = "minmax",
    calib_samples: int | None = None,
    keep_fp32: tuple[str, ...] = (),
    int8_isa: str | None = None,
    min_agreement: float | None = None,
    progress=None,
) -> Manifest:
    """Build `model` (an ONNX file or a directory of `<tower>.onnx`) into the bundle directory `out`.

    Args:
        backend: "ort" (CPU), "ort-cuda" or "tensorrt".
        precision: "fp32", "fp16", "bf16" or "int8" (int8 needs `calib`); decided in the ONNX by its lowering.
        calib: calibration data (file, folder of per-tower .npz or shards, dataset:NAME) for int8, and for
            fp16/bf16 to choose from measured activations which nodes stay FP32.
        batch: (min, opt, max) batch profile; TensorRT builds for it, every runner refuses batches outside it.
            None: DEFAULT_BATCH, or a fixed-shape graph's own batch (batch_profile).
        force: replace an existing `out`.
        ort_options: OrtOptions for ort / ort-cuda (default OrtOptions()).
        trt_options: TrtOptions for tensorrt (default TrtOptions()).
        save_optimized: also save ORT's optimised graph per tower (faster to load; tied to this ORT and CPU).
        timing_cache: a TensorRT timing cache kept across builds (default: one inside the bundle).
        int8_target: "cpu" or "tensorrt" Q/DQ formats (default: tensorrt for the tensorrt backend, else cpu).
        calib_method: int8 ranges, "minmax", "entropy" or "percentile". calib_samples: rows drawn (seeded) from
            the calibration data (default all). keep_fp32: int8 node names left in float.
        int8_isa: the CPU level cpu int8 weights are built for (calibration.isa; default this CPU's).
        min_agreement: cpu int8 held-out agreement target (default 0.99; 0 = plain INT8, no search).
        progress: called with one line per point the int8 search measures (default: silent).

    Returns the manifest written to `out/manifest.json`.
    """
    from toolkit.backends.ort.loader import OrtOptions
    from toolkit.backends.tensorrt.config import TrtOptions

    model, out = Path(model), Path(out)
    if backend not in BACKENDS:
        raise DcncError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if int8_target is not None and precision != "int8":
        raise DcncError("--int8-target applies to --precision int8 only")
    target = int8_target or ("tensorrt" if backend == "tensorrt" and precision == "int8" else "cpu")
    lower = Lowering(precision, target, calib_method, calib_samples, keep_fp32=tuple(keep_fp32), int8_isa=int8_isa,
                     min_agreement=min_agreement)  # fmt: skip
    lower.check(calib)
    check_source(calib)
    if precision == "bf16" and backend == "ort":
        raise DcncError("--precision bf16 needs a GPU backend (tensorrt or ort-cuda): ONNX Runtime's CPU provider has no bfloat16 Gemm")
    if save_optimized and backend == "tensorrt":
        raise DcncError("--save-optimized is an ONNX Runtime option; TensorRT bundles always hold an engine")
    if timing_cache is not None and backend != "tensorrt":
        raise DcncError("--timing-cache is a TensorRT option (use it with --backend tensorrt)")
    if backend == "ort" and ort_options is not None and (ort_options.cuda_graph or ort_options.allow_tf32):
        flag = "--cuda-graph" if ort_options.cuda_graph else "--allow-tf32"
        raise DcncError(f"{flag} needs a GPU backend (ort-cuda or tensorrt), not ort")
    towers = find_towers(model)
    batch = batch_profile(batch, towers)
    require_backend(backend)
    check_outputs([output(out, "-o", DIR, replace=force)], [model, *towers.values(), *source_files(calib)])
    ort_options = ort_options or OrtOptions()
    trt_options = trt_options or TrtOptions()

    options = {
        "backend": backend,
        "precision": precision,
        "batch": list(batch),
        "save_optimized": save_optimized,
        "timing_cache": str(timing_cache) if timing_cache is not None else None,
    }
    if backend == "tensorrt":
        options["tensorrt"] = trt_options.to_dict()
    else:
        options["ort"] = ort_options.to_dict()
    device_id = trt_options.device_id if backend == "tensorrt" else ort_options.device_id
    manifest = Manifest(
        backend=backend,
        precision=precision,
        batch={"min": batch[0], "opt": batch[1], "max": batch[2]},
        versions=installed_versions(backend),
        device=device_identity(backend, device_id),
        options=options,
        inputs={
            "model": {"path": str(model), "sha256": {t: source_sha256(p) for t, p in towers.items()}},
            "calib": source_identity(calib),
            "lowering": lower.to_dict(),
        },
        towers={},
    )
    portable: dict[str, bool] = {}
    with atomic_dir(out, force=force) as tmp:
        if backend == "tensorrt":
            cache = _prepare_timing_cache(tmp, out, timing_cache, trt_options, manifest)
        graphs = {tower: load_onnx(source, check=True) for tower, source in towers.items()}
        embedding_towers = sum(embedding_tower(graph) for graph in graphs.values())
        for tower, graph in graphs.items():
            say = (lambda line, tower=tower: progress(f"{tower}: {line}")) if progress else None
            digests = weight_digests(graph)  # before lowering: it may rewrite the graph in place
            lowered, record = lower(graph, calib, tower, embedding_towers, batch[1], say)
            onnx_rel = f"{tower}.onnx"
            save_onnx(lowered, tmp / onnx_rel)
            entry = TowerEntry(
                onnx=onnx_rel,
                inputs=tensor_entries(graph_inputs(lowered)),
                outputs=tensor_entries(graph_outputs(lowered)),
                source_sha256=manifest.inputs["model"]["sha256"][tower],
                lowering=record,
                source_weights=digests,
            )
            if backend == "tensorrt":
                from toolkit.backends.tensorrt.loader import build_engine

                entry.engine = f"{tower}.engine"
                entry.engine_info = build_engine(tmp / onnx_rel, tmp / entry.engine, entry.inputs, batch, trt_options, cache)
                portable[entry.engine] = False
            else:
                ort_options = _check_ort_session(tmp, entry, tower, backend, ort_options, save_optimized, portable,
                                                 manifest)  # fmt: skip
            manifest.towers[tower] = entry
        _check_kept_nodes(lower, manifest)
        if backend == "tensorrt":
            _finish_timing_cache(tmp, cache, timing_cache, portable)
        write_manifest(tmp, manifest, portable)
    return manifest


def _check_kept_nodes(lower: Lowering, manifest: Manifest) -> None:
    """Every --keep-fp32 name must be a node of some tower (each tower keeps those it has)."""
    kept = {n for entry in manifest.towers.values() if entry.lowering for n in entry.lowering.kept_fp32}
    missing = [n for n in lower.keep_fp32 if n not in kept]
    if missing:
        raise DcncError(f"--keep-fp32 {missing[0]!r}: no tower graph has a node of that name")


def _check_ort_session(tmp: Path, entry: TowerEntry, tower: str, backend: str, options, save_optimized: bool,
                       portable: dict, manifest: Manifest):  # fmt: skip
    """Open the lowered graph in ONNX Runtime (so a bundle that cannot load is never written), saving ORT's
    optimised graph when asked. Returns the options the bundle runs with: when onnxruntime cannot capture this
    tower in CUDA graphs, the bundle records cuda_graph off (for every tower) and ORT's reason."""
    from toolkit.backends.ort.loader import (
        CudaGraphRefused,
        ort_session,
        save_optimized_graph,
    )

    try:
        if save_optimized:
            entry.optimized_onnx = f"{tower}.ort-optimized.onnx"
            save_optimized_graph(tmp / entry.onnx, tmp / entry.optimized_onnx, backend, options)
            portable[entry.optimized_onnx] = False
        else:
            ort_session(tmp / entry.onnx, backend, options)
    except CudaGraphRefused as refused:
        options = replace(options, cuda_graph=False)
        manifest.options["ort"] = options.to_dict()
        manifest.options["cuda_graph_refused"] = str(refused)
        return _check_ort_session(tmp, entry, tower, backend, options, save_optimized, portable, manifest)
    return options


def _prepare_timing_cache(tmp: Path, out: Path, timing_cache, trt_options, manifest: Manifest) -> Path:
    """The timing cache this build reads and extends: the user's persistent one, or the bundle's own (carried
    over from the bundle being rebuilt). Its key is checked; a mismatch starts a fresh cache."""
    from toolkit.backends.tensorrt.loader import prepare_timing_cache, timing_cache_key

    key = timing_cache_key(trt_options.device_id)
    if timing_cache is not None:
        cache = Path(timing_cache)
        cache.parent.mkdir(parents=True, exist_ok=True)
    else:
        cache = tmp / TIMING_CACHE
        if (out / MANIFEST).is_file():  # rebuilding a bundle: start from its cache (and key) if it has one
            for name in (TIMING_CACHE, TIMING_CACHE + ".key.json"):
                if (out / name).is_file():
                    shutil.copyfile(out / name, tmp / name)
    manifest.caches["timing_cache"] = {"key": key, "outcome": prepare_timing_cache(cache, key)}
    return cache


def _finish_timing_cache(tmp: Path, cache: Path, timing_cache, portable: dict) -> None:
    """Keep a copy of the timing cache in the bundle (so `build --force` starts warm) and drop polygraphy's lock."""
    cache.with_name(cache.name + ".lock").unlink(missing_ok=True)
    if timing_cache is not None and cache.is_file():
        shutil.copyfile(cache, tmp / TIMING_CACHE)
        shutil.copyfile(cache.with_name(cache.name + ".key.json"), tmp / (TIMING_CACHE + ".key.json"))
    for name in (TIMING_CACHE, TIMING_CACHE + ".key.json"):
        portable[name] = False
