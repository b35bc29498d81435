"""Benchmark runners: each runtime `dcnc bench` times, made ready for one tower, giving a timed call per batch size.

torch eager, torch.compile and AOTInductor run the loaded module; ORT and TensorRT runners run bundles that
`toolkit.commands.build.build_bundle` builds on the fly from the exported graph (cached under `--out`, keyed by what
they are built from, re-checked with check_bundle before reuse), or bundles the user names with `--bundle`.
Inputs are made once per batch and placed on the device before timing, so only the model runs in the loop.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.backends.timing import TimedCall, device_call
from toolkit.core.errors import DcncError, first_line
from toolkit.model.loading import LoadedModel, LoadedTower


@dataclass(frozen=True)
class RunnerKind:
    """A runner `--runners` can name: its runtime, the precision it computes in, and where it runs."""

    name: str
    runtime: str  # torch | ort | ort-cuda | tensorrt
    precision: str
    devices: tuple[str, ...]

    @property
    def backend(self) -> str | None:
        """The bundle backend it runs (None for the torch runners)."""
        return None if self.runtime == "torch" else self.runtime


RUNNER_KINDS = {
    kind.name: kind
    for kind in (
        RunnerKind("eager", "torch", "fp32", ("cpu", "cuda")),
        RunnerKind("compile", "torch", "fp32", ("cpu", "cuda")),
        RunnerKind("aot", "torch", "fp32", ("cpu", "cuda")),
        RunnerKind("ort-fp32", "ort", "fp32", ("cpu",)),
        RunnerKind("ort-fp16", "ort", "fp16", ("cpu",)),
        RunnerKind("ort-int8", "ort", "int8", ("cpu",)),
        RunnerKind("ort-cuda-fp32", "ort-cuda", "fp32", ("cuda",)),
        RunnerKind("ort-cuda-fp16", "ort-cuda", "fp16", ("cuda",)),
        RunnerKind("tensorrt-fp32", "tensorrt", "fp32", ("cuda",)),
        RunnerKind("tensorrt-fp16", "tensorrt", "fp16", ("cuda",)),
        RunnerKind("tensorrt-int8", "tensorrt", "int8", ("cuda",)),
    )
}
DEFAULT_RUNNERS = {
    "cpu": ("eager", "compile", "ort-fp32", "ort-fp16", "ort-int8"),
    "cuda": ("eager", "compile", "ort-cuda-fp32", "ort-cuda-fp16", "tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8"),
}


class Prepared:
    """A runner ready for one tower. `call(batch)` returns the zero-argument call the timing loop runs (inputs
    already in place), or raises DcncError when this runner cannot run that batch; `close()` releases it."""

    def __init__(self, name: str, runtime: str, precision: str, setup_s: float = 0.0, source: str | None = None):
        self.name, self.runtime, self.precision = name, runtime, precision
        self.setup_s = setup_s
        self.source = source  # the bundle or package it runs, when it runs one

    def call(self, batch: int) -> TimedCall:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TowerFeeds:
    """The same random valid inputs for every runner of a tower, made once per batch size."""

    def __init__(self, tower: LoadedTower):
        self.tower = tower
        self._feeds: dict[int, dict[str, np.ndarray]] = {}

    def __call__(self, batch: int) -> dict[str, np.ndarray]:
        if batch not in self._feeds:
            self._feeds[batch] = self.tower.feeds(batch, seed=batch)
        return self._feeds[batch]


class TorchPrepared(Prepared):
    """A torch callable (the module, its torch.compile wrapper or an AOTInductor package) on tensors on `device`."""

    def __init__(self, name: str, fn: Any, tower: LoadedTower, feeds: TowerFeeds, device: str, **kwargs: Any):
        super().__init__(name, "torch", "fp32", **kwargs)
        self.fn, self.tower, self.feeds, self.device = fn, tower, feeds, device

    def call(self, batch: int) -> TimedCall:
        import torch

        low, high = self.tower.batch_range
        if batch < low or (high is not None and batch > high):
            raise DcncError(f"{self.name}: batch {batch} is outside the range {low}..{high} the program accepts")
        feed = self.feeds(batch)
        tensors = [torch.from_numpy(np.ascontiguousarray(feed[s.name])).to(self.device) for s in self.tower.input_specs]
        fn = self.fn

        def run() -> Any:
            with torch.inference_mode():
                return fn(*tensors)

        return run


class BundlePrepared(Prepared):
    """An ORT or TensorRT runner of one bundle tower, active; feeds cast to the dtypes its graph takes."""

    def __init__(self, name: str, kind: RunnerKind, runner: Any, feeds: TowerFeeds, device: str, **kwargs: Any):
        super().__init__(name, kind.runtime, kind.precision, **kwargs)
        self.runner, self.feeds, self.device = runner, feeds, device
        runner.activate()

    def call(self, batch: int) -> TimedCall:
        meta = self.runner.get_input_metadata()
        feed = {n: np.ascontiguousarray(a, dtype=meta[n].dtype) if n in meta else a for n, a in self.feeds(batch).items()}
        self.runner.check_feed(feed)  # a batch outside the bundle's profile is refused here, not in the loop
        return device_call(self.runner, feed, self.device)

    def close(self) -> None:
        self.runner.deactivate()


# --- sessions and bundles -----------------------------------------------------------------------------------
def bundle_kind(manifest: Any) -> RunnerKind:
    """The RunnerKind a user's bundle runs as (its backend and precision)."""
    device = "cpu" if manifest.backend == "ort" else "cuda"
    return RunnerKind(f"{manifest.backend}-{manifest.precision}", manifest.backend, manifest.precision, (device,))


class Workspace:
    """What runners are built from for one model, cached under `<out>/cache/<model key>/`: each tower's exported
    ONNX, bundles per backend and precision (kept while their stage stamp is current), AOTInductor packages.
    Calibration data: `calib` (toolkit.commands.calibration_data sources), else the model's own files."""

    def __init__(self, loaded: LoadedModel, out: str | Path, device: str, batch_sizes: tuple[int, ...],
                 threads: int | None = None, calib: str | Path | None = None):  # fmt: skip
        import torch

        self.loaded, self.device, self.threads = loaded, device, threads
        self.calib = calib
        sizes = sorted(batch_sizes)
        self.batch_profile = (sizes[0], sizes[len(sizes) // 2], sizes[-1])
        # what the export depends on: the model's bytes, its kind and file name (kept in the ONNX metadata), torch
        name = loaded.source if loaded.kind == "factory" else Path(loaded.source).name
        key = hashlib.sha256(f"{loaded.source_hash}|{loaded.kind}|{name}|torch {torch.__version__}".encode()).hexdigest()
        self.root = Path(out) / "cache" / key[:16]

    # --- exported graphs ------------------------------------------------------------------------------------
    def onnx(self, tower: str) -> Path:
        """The tower's exported ONNX (exported on first use, as `dcnc export` does)."""
        from graphs.export import export_tower, source_metadata

        path = self.root / "onnx" / f"{tower}.onnx"
        if not path.is_file():
            export_tower(self.loaded.towers[tower], path, metadata=source_metadata(self.loaded))
        return path

    def bundle(self, tower: str, kind: RunnerKind) -> Path:
        """A bundle of `tower` for `kind`'s backend and precision under the cache, rebuilt when its stage stamp
        (graph, calibration data, options, runtime versions) is not current, as `dcnc run` rebuilds a target."""
        from toolkit.backends.bundle import installed_versions
        from toolkit.commands.build import Lowering, build_bundle, source_sha256
        from toolkit.commands.calibration_data import source_hash, tower_source
        from toolkit.core.stamps import Stage

        onnx_path = self.onnx(tower)
        calib = None
        if kind.precision != "fp32":
            source = self.calib if self.calib is not None else self.loaded.calibration or None
            calib = tower_source(source, tower, self.loaded.towers[tower].input_specs)
        Lowering(kind.precision).check(calib)
        out = self.root / "bundles" / f"{tower}-{kind.backend}-{kind.precision}"
        stage = Stage(f"bench/{tower}/{kind.name}", out.with_name(out.name + ".stamp.json"), {
            "graph": source_sha256(onnx_path), "calib": source_hash(calib), "backend": kind.backend,
            "precision": kind.precision, "batch": self.batch_profile, "versions": installed_versions(kind.backend),
        }, {"bundle": out})  # fmt: skip
        if stage.current() is None:
            stage.invalidate()
            started = time.perf_counter()
            build_bundle(onnx_path, out, kind.backend, kind.precision, calib=calib, batch=self.batch_profile, force=True)
            stage.record(time.perf_counter() - started)
        return out

    def aot_package(self, tower: str) -> Path:
        """The tower compiled ahead of time by AOTInductor for this device (a .pt2 package)."""
        import torch

        from graphs.export import dynamic_shapes
        from toolkit.core.fileio import atomic_path

        path = self.root / "aot" / self.device / f"{tower}.pt2"
        if path.is_file():
            return path
        loaded = self.loaded.towers[tower]
        if loaded.program is not None:
            program = loaded.program
        else:
            feed = loaded.feeds(2)
            args = tuple(torch.from_numpy(feed[s.name]).to(self.device) for s in loaded.input_specs)
            program = torch.export.export(loaded.module, args, dynamic_shapes=dynamic_shapes(loaded))
        with atomic_path(path) as tmp:
            tmp.unlink()  # AOTInductor writes the package itself, to a name ending in .pt2
            package = tmp.with_suffix(".pt2")
            try:
                with warnings.catch_warnings():  # torch's own deprecation notices would break the progress bar
                    warnings.simplefilter("ignore", FutureWarning)
                    torch._inductor.aoti_compile_and_package(program, package_path=str(package))
                package.replace(tmp)
            finally:
                package.unlink(missing_ok=True)
        return path


# --- preparing one runner for one tower -----------------------------------------------------------------------
def prepare(kind: RunnerKind, tower: str, workspace: Workspace, feeds: TowerFeeds, batch_sizes: tuple[int, ...]) -> Prepared:
    """Make `kind` ready to time `tower`: compile or build what it needs (timed as setup_s). Raises DcncError
    with the reason when it cannot run here; the benchmark records that runner as skipped."""
    start = time.perf_counter()
    loaded = workspace.loaded.towers[tower]
    device = workspace.device
    if kind.runtime == "torch":
        fn = _torch_callable(kind.name, loaded, workspace)
        source = str(workspace.aot_package(tower)) if kind.name == "aot" else None  # cached by then
        prepared = TorchPrepared(kind.name, fn, loaded, feeds, device, source=source)
        if kind.name == "compile":
            for batch in batch_sizes:  # compile for every size here, so the timed warm-up only warms
                try:
                    call = prepared.call(batch)
                except DcncError:
                    continue  # a batch the tower refuses is recorded when it is timed
                _run_once(call, kind.name)
    else:
        from toolkit.backends.bundle import check_bundle, tower_runner

        bundle = workspace.bundle(tower, kind)
        runner = tower_runner(bundle, check_bundle(bundle), tower, workspace.threads, spinning=False)
        prepared = BundlePrepared(kind.name, kind, runner, feeds, device, source=str(bundle))
    prepared.setup_s = time.perf_counter() - start
    return prepared


def _torch_callable(name: str, loaded: LoadedTower, workspace: Workspace) -> Any:
    import torch

    module = loaded.module.eval().to(workspace.device)
    if name == "eager":
        return module
    if name == "compile":
        return torch.compile(module)  # mode "default"
    try:
        package = workspace.aot_package(loaded.name)
        return torch._inductor.aoti_load_package(str(package))
    except DcncError:
        raise
    except Exception as err:  # inductor raises its own errors (no C++ compiler, unsupported op, ...)
        raise DcncError(f"AOTInductor cannot compile tower {loaded.name} here: {first_line(err)[:300]}") from None


def _run_once(call: TimedCall, name: str) -> None:
    try:
        call()
    except Exception as err:  # torch.compile's backend failures come in many types; they are a reason to skip
        raise DcncError(f"{name}: {type(err).__name__}: {first_line(err)[:300]}") from None

