"""`dcnc run`: the stages of a pipeline in order, train-if-needed -> export -> build -> verify, each skipped
while its stamp (toolkit.core.stamps) says it is current; returns the run summary (schema dcnc.run/1).

Output folder, per model:

    <out>/<model>/train/                   an example model's checkpoint, eval and calibration files
    <out>/<model>/export/  export.stamp.json      one <tower>.onnx per tower
    <out>/<model>/<target>/bundle/  build.stamp.json
    <out>/<model>/<target>/report.json, report.md, junit.xml  verify.stamp.json
    <out>/summary.json, <out>/report.html

Every gate of every target is decided before the run ends: a failing target does not stop the others.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit import __version__
from toolkit.commands.calibration_data import source_hash
from toolkit.commands.run.pipeline import (
    EXAMPLE_MODELS,
    EXPORT_DIR,
    EXPORT_STAMP,
    HTML_REPORT,
    SUMMARY,
    TRAIN_DIR,
    ModelJob,
    Pipeline,
    Target,
    describe,
)
from toolkit.core.errors import DcncError
from toolkit.core.fileio import write_json
from toolkit.core.paths import FOLDER, check_outputs, output
from toolkit.core.stamps import Stage, content_hash
from toolkit.report.runsummary import target_summary

SCHEMA = "dcnc.run/1"
REPORT_FILES = {"report": "report.json", "markdown": "report.md", "junit": "junit.xml"}

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    """Progress sink of a quiet run."""


def _timed(say: Say, label: str, stage: Stage, force: bool, work: Callable[[], None], done: str = "built"
           ) -> tuple[str, dict[str, str]]:
    """Run `work` unless `stage` is current (and not forced); (`done` or "current", the output hashes)."""
    recorded = None if force else stage.current()
    if recorded is not None:
        say(f"{label}: current")
        return "current", recorded
    stage.invalidate()
    say(f"{label}: running")
    started = time.perf_counter()
    work()
    seconds = time.perf_counter() - started
    say(f"{label}: done in {seconds:.1f} s")
    return done, stage.record(seconds)


# --- model source -----------------------------------------------------------------------------------------------
def _source(job: ModelJob, folder: Path, quiet: bool, say: Say) -> tuple[str, str]:
    """The checkpoint / .pt2 / factory to load, and the train outcome ("trained", "current" or "none").
    An example is trained into <model>/train/ (toolkit.example.train.ensure_examples keeps it while its key matches)."""
    if job.example is None:
        return job.source, "none"
    from toolkit.example.train import ensure_examples

    family = EXAMPLE_MODELS[job.example]
    say(f"{job.name} train: checking {folder / TRAIN_DIR}")
    started = time.perf_counter()
    result = ensure_examples(folder / TRAIN_DIR, job.dataset, None, (family,), job.epochs, job.seed, quiet)[family]
    if result["trained"]:
        say(f"{job.name} train: done in {time.perf_counter() - started:.1f} s")
        return result["checkpoint"], "trained"
    say(f"{job.name} train: current")
    return result["checkpoint"], "current"


# --- stages -----------------------------------------------------------------------------------------------------
def _export(job: ModelJob, loaded, folder: Path, force: bool, say: Say) -> tuple[str, dict[str, str]]:
    import onnx
    import torch

    from toolkit.commands.export import export_model

    settings = job.export
    export_dir = folder / EXPORT_DIR
    eval_rows = loaded.eval_data if settings.validate and loaded.eval_data is not None else None
    stage = Stage(f"{job.name}/export", folder / EXPORT_STAMP, {
        "source": loaded.source_hash, "kind": loaded.kind, "settings": dataclasses.asdict(settings),
        "validation_rows": content_hash(eval_rows) if eval_rows is not None else None,
        "torch": torch.__version__, "onnx": onnx.__version__,
    }, {"export": export_dir})

    def work() -> None:
        several = len(loaded.towers) > 1
        if not several and export_dir.exists():
            shutil.rmtree(export_dir)  # a single tower is written as a file into the folder: clear leftovers
        target = export_dir if several else export_dir / f"{next(iter(loaded.towers))}.onnx"
        export_model(loaded, target, settings.opset, settings.validate, force=True,
                     validate_batch=settings.validate_batch, passes=list(settings.passes) or None)

    return _timed(say, f"{job.name} export", stage, force, work)


def _build(job: ModelJob, target: Target, export_dir: Path, export_hashes: dict, calib: Path | dict | None,
           folder: Path, force: bool, say: Say) -> tuple[str, dict[str, str]]:
    from toolkit.backends.bundle import installed_versions
    from toolkit.backends.ort.loader import OrtOptions
    from toolkit.commands.build import build_bundle

    bundle = folder / "bundle"
    options = {k: v for k, v in dataclasses.asdict(target).items() if k not in ("name", "gates", "calib")}
    stage = Stage(f"{job.name}/{target.name}/build", folder / "build.stamp.json", {
        "export": export_hashes, "options": options,
        "calib": source_hash(calib),  # content, not path: an out folder may move
        "versions": installed_versions(target.backend),
    }, {"bundle": bundle})

    def work() -> None:
        extra = {"calib_method": target.calib_method} if target.precision == "int8" else {}
        if target.calib_samples is not None and calib is not None:
            extra["calib_samples"] = target.calib_samples
        build_bundle(export_dir, bundle, backend=target.backend, precision=target.precision, calib=calib,
                     batch=target.batch, force=True, ort_options=OrtOptions(threads=target.threads), **extra)

    return _timed(say, f"{job.name}/{target.name} build", stage, force, work)


def _verify(job: ModelJob, target: Target, source: str, source_hash: str, data: Path, build_hashes: dict,
            folder: Path, force: bool, say: Say) -> tuple[str, dict[str, Any]]:
    from toolkit.commands.verify import verify
    from toolkit.evaluate.latency import LatencyPolicy
    from toolkit.evaluate.verify import VerifyOptions

    settings = job.verify
    gates = {**settings.gates, **target.gates}
    options = VerifyOptions(ks=settings.ks, batch_sizes=settings.batch_sizes, iterations=settings.iterations,
                            warmup=settings.warmup, latency=settings.latency,
                            policy=LatencyPolicy(settings.latency_ci, settings.latency_budget))
    paths = {name: folder / file for name, file in REPORT_FILES.items()}
    stage = Stage(f"{job.name}/{target.name}/verify", folder / "verify.stamp.json", {
        "bundle": build_hashes, "reference": source_hash, "data": content_hash(data),
        "options": dataclasses.asdict(options), "branches": settings.branches, "gates": gates,
        "device": target.device,
    }, paths)

    def work() -> None:
        verify(source, folder / "bundle", data, target.device, options, None, gates, None, settings.branches,
               outputs=paths)

    outcome, _ = _timed(say, f"{job.name}/{target.name} verify", stage, force, work, done="verified")
    report = json.loads(paths["report"].read_text())
    say(f"{job.name}/{target.name}: {'PASS' if report['passed'] else 'FAIL'}")
    return outcome, report


# --- one model, the whole run -----------------------------------------------------------------------------------
def _check_targets(job: ModelJob, where: str) -> None:
    """Refuse, before any work, a target whose backend cannot run on this machine."""
    from toolkit.backends import require_backend

    for target in job.targets:
        try:
            require_backend(target.backend)
        except DcncError as err:
            raise DcncError(f"{where}: model {job.name}, target {target.name}: {err}") from None


def _run_model(job: ModelJob, out: Path, force: bool, quiet: bool, say: Say, where: str
               ) -> tuple[dict, list[dict], dict[str, dict]]:
    """The model's summary entry, its targets' summary entries, and their verify reports by "model/target"."""
    from toolkit.evaluate.validate import ParityFailed
    from toolkit.model.loading import load_model

    folder = out / job.name
    source, trained = _source(job, folder, quiet, say)
    loaded = load_model(source)
    data = job.verify.data or loaded.eval_data
    if data is None:
        raise DcncError(f"{where}: model {job.name}: {source} names no evaluation data; set verify.data")
    default_calib = job.calib or loaded.calibration or None  # the model's calib, else the checkpoint's files
    calibs = {t.name: t.calib or (default_calib if t.precision != "fp32" else None) for t in job.targets}
    for target in job.targets:
        try:
            target.lowering().check(calibs[target.name])
        except DcncError as err:
            raise DcncError(f"{where}: model {job.name}, target {target.name}: {err}") from None
    model_entry: dict[str, Any] = {"name": job.name, "source": source, "stages": {"train": trained}}
    try:
        outcome, export_hashes = _export(job, loaded, folder, force, say)
    except ParityFailed as failed:  # the ONNX differs from torch: no target of this model can pass
        model_entry["stages"]["export"] = "failed"
        model_entry["error"] = f"export validation failed: {str(failed).splitlines()[0]}"
        say(f"{job.name} export: FAILED ({model_entry['error']})")
        return model_entry, [_failed_target(job, t, model_entry["error"]) for t in job.targets], {}
    model_entry["stages"]["export"] = outcome
    model_entry["export"] = str(folder / EXPORT_DIR)
    entries, reports = [], {}
    for target in job.targets:
        tdir = folder / target.name
        calib = calibs[target.name]
        built, build_hashes = _build(job, target, folder / EXPORT_DIR, export_hashes, calib, tdir, force, say)
        verified, report = _verify(job, target, source, loaded.source_hash, Path(data), build_hashes, tdir, force, say)
        paths = {"bundle": str(tdir / "bundle"), **{k: str(tdir / f) for k, f in REPORT_FILES.items()}}
        entries.append(target_summary(job.name, target, report, {"build": built, "verify": verified}, paths))
        reports[f"{job.name}/{target.name}"] = report
    return model_entry, entries, reports


def _failed_target(job: ModelJob, target: Target, error: str) -> dict[str, Any]:
    return {"model": job.name, "target": target.name, "backend": target.backend, "precision": target.precision,
            "passed": False, "error": error, "stages": {"build": "skipped", "verify": "skipped"},
            "parity": None, "quality": None, "latency": None,
            "failed_gates": [], "gates": {"passed": 0, "total": 0}, "paths": {}}


def run_pipeline(pipeline: Pipeline, out: str | Path, force: bool = False, quiet: bool = False,
                 say: Say | None = None) -> dict[str, Any]:
    """Run every stage of every model of `pipeline` into the folder `out`; the summary (also written to
    <out>/summary.json, and every target's report to <out>/report.html).

    force: redo every stage, current or not. quiet: no training progress bars. say: progress lines (stages
    started, done, current, each target's verdict). Raises DcncError for bad input before or during a stage
    (exit 2); gate failures are in the summary (`passed`), never raised.
    """
    say = say or _quiet
    out = Path(out)
    check_outputs([output(out, "--out", FOLDER)], pipeline_inputs(pipeline))
    for job in pipeline.models:
        _check_targets(job, pipeline.label)
    started = time.perf_counter()
    models, targets, reports = [], [], {}
    for job in pipeline.models:
        entry, entries, model_reports = _run_model(job, out, force, quiet, say, pipeline.label)
        models.append(entry)
        targets.extend(entries)
        reports.update(model_reports)
    summary = {
        "schema": SCHEMA,
        "passed": all(t["passed"] for t in targets),
        "pipeline": describe(pipeline),
        "out": str(out),
        "dcnc": __version__,
        "models": models,
        "targets": targets,
        "html_report": _write_html(reports, out / HTML_REPORT, f"dcnc run: {pipeline.label}"),
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json(out / SUMMARY, summary)
    return summary


def pipeline_inputs(pipeline: Pipeline) -> list[Path | str]:
    """What a run reads that the user gave it: the pipeline file and the files its models name."""
    named: list[Path | str] = [pipeline.path] if pipeline.path is not None else []
    for job in pipeline.models:
        named += [job.source, job.calib, job.verify.data, *(t.calib for t in job.targets)]
    return [p for p in named if p is not None]


def _write_html(reports: dict[str, dict], path: Path, title: str) -> str:
    """<out>/report.html: every target's verify report on one page; its path."""
    from toolkit.report.html import write_html

    write_html(reports, path, title)
    return str(path)
